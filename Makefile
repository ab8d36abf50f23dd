# The two commands of the README. Each creates .venv with pip if it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch/torchvision are pinned to the releases this machine has on disk; see README "The two commands".
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	MPLBACKEND=Agg $(BIN)/python -m pneumoscan.cli.demo

test: install
	MPLBACKEND=Agg $(BIN)/python -m pytest

clean:
	rm -rf demo-out .pytest_cache
