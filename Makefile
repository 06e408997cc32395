# The two commands of the README:  `make demo`  and  `make test`.
# Everything the project needs is installed from here, so a clean checkout works.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench bench-ptq binary system-deps clean

# Debian packages the tests use: systemd-analyze (unit checks), mosquitto (a real MQTT broker
# in every MQTT test), chromium and its driver (the web pages' browser tests). Installed when
# missing and running as root.

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgert demo

lint: $(STAMP)
	$(VENV)/bin/ruff check edge_runtime tests bench tools
	$(VENV)/bin/ruff format --check edge_runtime tests bench tools
	$(VENV)/bin/mypy
	$(PY) tools/check_layers.py

system-deps:
	@missing=""; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	test -x /usr/sbin/mosquitto || missing="$$missing mosquitto"; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	test -x /usr/bin/chromedriver || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:$$missing (install them, or run as root)"; exit 1; fi; \
	fi

test: lint system-deps
	$(PY) -m pytest

# Local loop: skip the heavy tests (TensorFlow conversion, binary build, soaks).
test-fast: $(STAMP) system-deps
	$(PY) -m pytest -m 'not slow'

bench: $(STAMP)
	$(PY) bench/bench_pack.py
	$(PY) bench/bench_serve.py

# The packer against ORT's defaults and NNCF: the competing tools live in their own environment,
# never in the project's dependencies.
.venv-bench/.installed: pyproject.toml
	test -x .venv-bench/bin/python || $(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install --quiet --upgrade pip
	.venv-bench/bin/python -m pip install --quiet -e '.[pack]' nncf matplotlib
	touch .venv-bench/.installed

bench-ptq: .venv-bench/.installed
	.venv-bench/bin/python bench/bench_ptq.py

binary:
	bash packaging/build-binary.sh

clean:
	rm -rf $(VENV) .venv-build .venv-bench build dist .pytest_cache .mypy_cache .ruff_cache
