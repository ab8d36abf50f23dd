"""What every command's parser shares: the help formatter, ``add_parser`` and the lists of names
that must not import the library to show ``--help``."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("pneumoscan")


CAM_METHODS = ("gradcam", "gradcam++", "eigencam")  # explain.METHODS; not imported here to keep --help fast


ENGINES = ("auto", "onnx", "torch")  # inference.loading.KINDS, likewise


SETTING = "setting:"  # dest prefix of flags that set a config field: "setting:train.epochs"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default once, as "[value]": appended from the parser's default when there is
    one; training flags (default None, so an unset flag leaves the config alone) carry the
    config's default in their help text instead. A one-line description is wrapped to the
    terminal; one with line breaks is printed as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if "%(default)" in help or action.default is None or action.default is False \
                or action.default is argparse.SUPPRESS or action.default == []:
            return help
        return f"{help} [%(default)s]"


def add_parser(sub, name: str, help: str, description: str | None = None, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description or help[:1].upper() + help[1:] + ".",
                          formatter_class=_Formatter, **kwargs)


def skipped_line(path: str, reason: str) -> str:
    """One line per skipped file, whether the library's reason already starts with the path or not."""
    return f"pneumoscan: skipped {path}: {reason.removeprefix(f'{path}: ')}"


def add_outside_population(p) -> None:
    p.add_argument("--outside-population", choices=("not-assessed", "warn"), default=None,
                   help="what the flag outside_training_population (a frontal chest film unlike the training films, "
                        "e.g. an adult's) does to the label: not-assessed (default), or warn = give the label and "
                        "keep the flag, only at a site that validated the model on its own films "
                        "[$PNEUMOSCAN_OUTSIDE_POPULATION or not-assessed]")


def apply_outside_population(args: argparse.Namespace) -> None:
    """The option becomes the process's policy (``decision.POLICY_ENV``), so every face in this
    process (CSV, report, API, page, node) decides alike."""
    value = getattr(args, "outside_population", None)
    if value is not None:
        import os

        from pneumoscan.safety import decision

        os.environ[decision.POLICY_ENV] = decision.outside_policy(value)
