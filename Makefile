# Two commands do all setup: `make demo` (the main job) and `make test` (the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml setup.py $(wildcard proto/minedraft/protos/*.proto)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

.PHONY: install models demo test lint
install: $(BIN)/.installed

models: install
	$(BIN)/minedraft models fetch

demo: models
	$(BIN)/minedraft demo

lint: install
	$(BIN)/ruff check .

test: models lint
	$(BIN)/pytest -q
