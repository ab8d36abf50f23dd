"""core.rules: one parser per rule language, returning typed values; config and the torch side use it."""

import ast
from pathlib import Path

import pytest

import pneumoscan
from pneumoscan.core import config, rules
from pneumoscan.core.rules import HeadLayer, RuleError, ThresholdRule


@pytest.mark.parametrize("text, expected", [
    ("youden", ThresholdRule("youden", None, "youden")),
    (" youden ", ThresholdRule("youden", None, "youden")),
    ("sensitivity:0.95", ThresholdRule("sensitivity", 0.95, "sensitivity:0.95")),
    ("sensitivity:1", ThresholdRule("sensitivity", 1.0, "sensitivity:1")),
    ("0.5", ThresholdRule("fixed", 0.5, "0.5")),
])
def test_threshold_rules_parse_to_typed_values(text, expected):
    assert rules.parse_threshold(text) == expected


@pytest.mark.parametrize("text", ["bogus", "", "youden:0.9", "sensitivity:", "sensitivity:x", "sensitivity:1.5",
                                  "sensitivity:0", "0", "1", "1.5", "-0.1", "nan"])
def test_bad_threshold_rules_name_the_setting(text):
    with pytest.raises(RuleError, match=r"\(train.threshold\).*youden"):
        rules.parse_threshold(text, "train.threshold")
    assert "train.threshold" in config.check_threshold_rule(text)


def test_fixed_and_fitted_rules_describe_themselves():
    assert rules.parse_threshold("0.5").describe() == "fixed at 0.5 on the calibrated probability"
    assert not rules.parse_threshold("0.5").fitted and rules.parse_threshold("youden").fitted


@pytest.mark.parametrize("text, expected", [("none", None), (" none ", None), ("conformal:0.95", 0.95),
                                            ("conformal:0.8", 0.8)])
def test_unsure_rules(text, expected):
    assert rules.parse_unsure(text) == expected
    assert config.check_unsure_rule(text) is None


@pytest.mark.parametrize("text", ["conformal:1", "conformal:0", "conformal:", "maybe", "conformal:0.9x"])
def test_bad_unsure_rules(text):
    with pytest.raises(RuleError, match="UNSURE rule"):
        rules.parse_unsure(text)
    assert "train.unsure" in config.check_unsure_rule(text)


def test_head_specs_parse_to_layers():
    assert rules.parse_head("seed") == (HeadLayer("dense", size=64), HeadLayer("bn"), HeadLayer("bn"),
                                        HeadLayer("dense", size=32))
    assert rules.parse_head("128, d0.3 ,bn") == (HeadLayer("dense", size=128), HeadLayer("dropout", p=0.3),
                                                 HeadLayer("bn"))
    assert rules.parse_head("linear") == () == rules.parse_head("")
    for bad in ("64,relu", "d1.5", "bn,x", "٣"):
        with pytest.raises(RuleError, match="bad head spec"):
            rules.parse_head(bad)
        assert config.check_head(bad) is not None


def test_unfreeze_schedules():
    assert rules.parse_unfreeze("1:3,3:-1") == {1: 3, 3: -1}
    assert rules.parse_unfreeze(" 2 : 4 ") == {2: 4} and rules.parse_unfreeze("") == {}
    for bad in ("soon", "1:x", "1-3", "1:3:4", "-1:3"):
        with pytest.raises(RuleError, match="unfreeze schedule"):
            rules.parse_unfreeze(bad)
        assert config.check_unfreeze_at(bad) is not None


PARSERS = {"parse_threshold", "parse_unsure", "parse_head", "parse_unfreeze"}


def test_each_rule_has_one_parser():
    """No module but core.rules defines a parser of these languages (the drift issue 20 found:
    two parsers of one rule that disagreed on its bounds)."""
    package = Path(pneumoscan.__file__).parent
    defined = {}
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and (node.name in PARSERS or node.name.startswith("parse_unsure")):
                defined.setdefault(node.name, []).append(str(path.relative_to(package)))
    assert defined == {name: ["core/rules.py"] for name in PARSERS}
