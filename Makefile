# Two commands set everything up on a fresh machine:
#   make demo   install into .venv if needed, then train + evaluate GFocalV2 on the embedded dataset
#   make test   install into .venv if needed, then run the test suite
# Both reuse .venv on a second run: the install step is a no-op while its inputs are unchanged.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gfocalv2-installed
PYTEST_ARGS ?=

RUFF_VERSION := 0.17.5

.PHONY: install demo test test-slow lint format clean-venv

install: $(STAMP)

$(STAMP): requirements.txt setup.py tools/install_detectron2.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel
	$(PY) -m pip install -q -r requirements.txt
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import gfocalv2, detectron2.engine, detectron2.evaluation; print('gfocalv2 environment ready')"
	@touch $@

demo: install
	$(PY) projects/DigitScenes/train_digits.py

test: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS) tests

# Lint and formatting (ruff, settings in pyproject.toml); `make format` rewrites the files.
lint: install
	@$(PY) -m ruff --version 2>/dev/null | grep -q "$(RUFF_VERSION)" || $(PY) -m pip install -q ruff==$(RUFF_VERSION)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	@$(PY) -m ruff --version 2>/dev/null | grep -q "$(RUFF_VERSION)" || $(PY) -m pip install -q ruff==$(RUFF_VERSION)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean-venv:
	rm -rf $(VENV)
