# The README's two commands. Each creates .venv on first use and installs the
# package into it (editable, with the dev extra), then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) experiments/demo.py

test: $(STAMP)
	$(PY) -m pytest -n auto

# The edit-test loop: the tests not marked slow (those that train through the
# trainer or the CLI, start processes, run an experiment, or take seconds alone).
test-fast: $(STAMP)
	$(PY) -m pytest -n auto -m "not slow"
