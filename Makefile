# The two set-up commands of the README:  `make demo`  and  `make test`.
# Each creates a local virtual environment (.venv) and installs the pinned project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED ?= 0
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT ?= false
# Jobs and tests that start `python` or `ray` by name get the project's environment.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install system-deps demo test test-cluster bench
install: $(VENV)/.installed

# The 2AFC study's tests need a real browser and a real database server: Debian's chromium,
# chromium-driver and postgresql. Installed here when missing and this user can (root with
# apt-get); otherwise a note, and those tests skip saying why (they fail in CI: CI=true).
STUDY_PACKAGES := chromium chromium-driver postgresql
system-deps:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromedriver"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || missing="$$missing initdb"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "system-deps: missing$$missing; apt-get install -y $(STUDY_PACKAGES)"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(STUDY_PACKAGES); \
	else \
		echo "system-deps: missing$$missing and not root with apt-get: the study's browser/PostgreSQL tests will skip (install $(STUDY_PACKAGES))"; \
	fi

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: install
	$(PY) jobs/quickstart.py

test: install system-deps
	$(PY) -m pytest tests

# Only the multi-node fault tests (README "Faults survived"); `make test` runs them too.
test-cluster: install
	$(PY) -m pytest -m cluster tests/test_cluster_faults.py

bench: install
	$(PY) benchmarks/bench_unet.py --preset peer-128 --batch-size 2
