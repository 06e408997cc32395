# The two commands of the README:  `make demo`  and  `make test`.
# Everything the project needs is installed from here, so a clean checkout works.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgert demo

lint: $(STAMP)
	$(VENV)/bin/ruff check edge_runtime tests bench
	$(VENV)/bin/ruff format --check edge_runtime tests bench
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest

# Local loop: skip the heavy tests (TensorFlow conversion, binary build, soaks).
test-fast: $(STAMP)
	$(PY) -m pytest -m 'not slow'

bench: $(STAMP)
	$(PY) bench/bench_pack.py

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
