"""The small rule languages of a run, parsed in one place into typed values.

A threshold rule (``train.threshold``), an UNSURE rule (``train.unsure``), a head spec
(``model.head``) and an unfreezing schedule (``train.unfreeze_at``) are strings in config.yaml and on
the command line. Each has exactly one parser here: ``core.config`` calls it to validate a run
before anything is decoded, and the code that acts on the rule (``core.calibration``,
``training.calibrate``, ``modeling.heads``, ``modeling.models``) calls the same parser, so what is
accepted and what runs cannot drift apart. Nothing here imports torch or numpy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pneumoscan.core.errors import UserError

THRESHOLD_RULES = '"youden", "sensitivity:<recall in (0, 1]>" (e.g. "sensitivity:0.95") or a number in (0, 1) (e.g. "0.5")'
UNSURE_RULES = '"none" or "conformal:<confidence in (0, 1)>" (e.g. "conformal:0.95")'
UNFREEZE_RULES = "EPOCH:STAGES pairs like '2:3,4:-1' (-1 = all)"

# Head specs: comma-separated layers after global average pooling; a number is Dense+ReLU,
# "bn" BatchNorm1d, "dN" dropout with p=N. The final Dense(1) is implicit. The names are the
# seed study's experiments (its table: exp 9 = "2x BN, no dropout" was best).
HEADS = {
    "seed": "64,bn,bn,32",  # experiment 9, the study's final model
    "exp1": "64,d0.5",
    "exp2": "64,64,d0.5",
    "exp3": "64,d0.3",
    "exp4": "64,d0.7",
    "exp5": "128,64,d0.5",
    "exp6": "64",
    "exp7": "64,bn",
    "exp8": "64,bn,32,bn",
    "exp9": "64,bn,bn,32",
    "exp10": "128,bn,64,bn,32",
    "linear": "",
}

_DROPOUT = re.compile(r"d(0?\.\d+)")
_UNFREEZE_PAIR = re.compile(r"\s*(\d+)\s*:\s*(-?\d+)\s*")


class RuleError(UserError):
    """A rule string that does not parse; the message names the rule and what is accepted."""


def _where(key: str | None) -> str:
    return f" ({key})" if key else ""


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class ThresholdRule:
    """How the operating threshold is chosen: fitted on validation (``youden``, ``sensitivity``
    at ``value`` recall) or ``fixed`` at ``value`` on the calibrated probability."""

    kind: Literal["youden", "sensitivity", "fixed"]
    value: float | None
    text: str  # the rule as written (stripped), recorded in ModelMeta.threshold_rule

    @property
    def fitted(self) -> bool:
        return self.kind != "fixed"

    def describe(self) -> str:
        """How a threshold came about, for reports."""
        if self.kind == "fixed":
            return f"fixed at {self.value:g} on the calibrated probability"
        return f"{self.text} on the validation split"


def parse_threshold(rule: str, key: str | None = None) -> ThresholdRule:
    """``"youden"``, ``"sensitivity:0.95"`` (recall in (0, 1]) or a fixed number in (0, 1)."""
    text = str(rule).strip()
    if text == "youden":
        return ThresholdRule("youden", None, text)
    if text.startswith("sensitivity:"):
        target = _float(text.removeprefix("sensitivity:"))
        if target is None or not 0 < target <= 1:
            raise RuleError(f"bad threshold rule {text!r}{_where(key)}: the sensitivity must be in (0, 1]; "
                            f"use {THRESHOLD_RULES}")
        return ThresholdRule("sensitivity", target, text)
    value = _float(text)
    if value is None:
        raise RuleError(f"unknown threshold rule {text!r}{_where(key)}; use {THRESHOLD_RULES}")
    if not 0 < value < 1:  # 0 or 1 would call every film one class
        raise RuleError(f"threshold rule {text!r}{_where(key)} is outside (0, 1); use {THRESHOLD_RULES}")
    return ThresholdRule("fixed", value, text)


def parse_unsure(rule: str, key: str | None = None) -> float | None:
    """The confidence of an UNSURE rule (``"conformal:0.95"`` -> 0.95), None for ``"none"``."""
    text = str(rule).strip()
    if text == "none":
        return None
    if text.startswith("conformal:"):
        value = _float(text.removeprefix("conformal:"))
        if value is not None and 0 < value < 1:
            return value
        raise RuleError(f"bad UNSURE rule {text!r}{_where(key)}: the confidence must be in (0, 1); use {UNSURE_RULES}")
    raise RuleError(f"unknown UNSURE rule {text!r}{_where(key)}; use {UNSURE_RULES}")


@dataclass(frozen=True)
class HeadLayer:
    """One layer of a head spec: ``dense`` (``size`` units, then ReLU), ``bn`` or ``dropout`` (``p``)."""

    kind: Literal["dense", "bn", "dropout"]
    size: int = 0
    p: float = 0.0


def parse_head(spec: str, key: str | None = None) -> tuple[HeadLayer, ...]:
    """A head name (``HEADS``) or spec like ``"64,bn,d0.3,32"`` -> its layers before the final Dense(1)."""
    text = HEADS.get(spec, spec)
    layers = []
    for token in filter(None, (t.strip() for t in text.split(","))):
        if token == "bn":
            layers.append(HeadLayer("bn"))
        elif _DROPOUT.fullmatch(token):
            layers.append(HeadLayer("dropout", p=float(token[1:])))
        elif token.isascii() and token.isdigit():
            layers.append(HeadLayer("dense", size=int(token)))
        else:
            raise RuleError(f"bad head spec {spec!r}{_where(key)} at {token!r}: use names {', '.join(HEADS)} or "
                            "comma-separated layers like '64,bn,d0.3,32'")
    return tuple(layers)


def parse_unfreeze(schedule: str, key: str | None = None) -> dict[int, int]:
    """A progressive-unfreezing schedule ``"EPOCH:STAGES,..."`` -> {epoch: stages} (-1 = all)."""
    out: dict[int, int] = {}
    for part in filter(None, (p.strip() for p in schedule.split(","))):
        match = _UNFREEZE_PAIR.fullmatch(part)
        if not match:
            raise RuleError(f"bad unfreeze schedule {schedule!r}{_where(key)}: use {UNFREEZE_RULES}")
        out[int(match.group(1))] = int(match.group(2))
    return out
