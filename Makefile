# Two entry points: `make demo` runs the main job on the embedded synthetic data,
# `make test` runs the test suite. Both create or reuse the local virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medtl-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,codecs,imagenet]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medtl demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
