# Two entry points: `make demo` (train + evaluate the tiny model on synthetic data, CPU)
# and `make test`. Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,export,metrics]'
	$(BIN)/pip install -q --no-deps panopticapi-lite
	touch $@

.PHONY: install demo test lint
install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/python train.py experiment=demo
	$(BIN)/python evaluate.py experiment=demo checkpoint=outputs/demo

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not gpu" -q

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
