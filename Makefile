# Two entry points; each builds its own virtual environment (.venv) on first use.
#   make demo   pretrain the demo config end to end on CPU (a few minutes), into workdir/demo
#   make test   run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= workdir/demo

.PHONY: demo test clean

$(BIN)/activate: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/activate

demo: $(BIN)/activate
	$(BIN)/python -m pretrain --config=configs/pretrain.py:demo --workdir=$(WORKDIR)

test: $(BIN)/activate
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) workdir .pytest_cache
