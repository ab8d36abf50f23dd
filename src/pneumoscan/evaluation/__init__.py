"""Measuring a model: evaluate, report, plots, explanations, robustness, compare, explore."""
