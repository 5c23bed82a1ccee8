# The two set-up commands of the README:  `make demo`  and  `make test`.
# Each creates a local virtual environment (.venv) and installs the pinned project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED ?= 0
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT ?= false
# Jobs and tests that start `python` or `ray` by name get the project's environment.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo test bench
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: install
	$(PY) jobs/quickstart.py

test: install
	$(PY) -m pytest tests

bench: install
	$(PY) benchmarks/bench_unet.py --preset peer-128 --batch-size 2
