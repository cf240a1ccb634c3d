# Two entry points: `make demo` runs the main job on the embedded synthetic data,
# `make test` checks the code (ruff, mypy: `make lint`) and runs the test suite. Both create or
# reuse the local virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medtl-installed

.PHONY: demo lint test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,codecs,imagenet]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medtl demo --out runs/demo

lint: $(STAMP)
	$(BIN)/ruff check medtl tests scripts
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
