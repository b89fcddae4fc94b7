# Two entry points (see README): `make demo` runs the main job on the embedded default, `make test` runs the checks.
# Both set up .venv first when it is missing or pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
DEMO_DATA := data/demo
PYTEST_ARGS ?=


.PHONY: setup setup-dev demo train test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

# Real Fashion-MNIST items come from Debian's package; install it where apt is available.
$(FMNIST):
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	else \
	  echo "Fashion-MNIST is missing: install Debian's package 'dataset-fashion-mnist' (sudo apt-get install dataset-fashion-mnist)"; exit 1; \
	fi

# The production-shaped stack's tests (cluster/local) need PostgreSQL and a few system tools; the MLflow UI
# test (tests/test_mlflow_ui.py) needs Chromium.
DEBIAN_TOOLS := /usr/lib/postgresql /usr/bin/curl /usr/bin/ss /usr/bin/setsid /usr/bin/chromium
$(DEBIAN_TOOLS):
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq postgresql curl iproute2 util-linux chromium || (apt-get update -qq && apt-get install -y -qq postgresql curl iproute2 util-linux chromium)) >/dev/null; \
	else \
	  echo "missing $@: install Debian's postgresql curl iproute2 util-linux chromium"; exit 1; \
	fi

setup: $(STAMP) $(FMNIST)

setup-dev: setup $(DEBIAN_TOOLS)

$(DEMO_DATA)/annotations/instances_val2014.json: | setup
	$(VENV)/bin/q2l data demo --out $(DEMO_DATA)

demo: setup $(DEMO_DATA)/annotations/instances_val2014.json
	$(VENV)/bin/q2l tune --config experiments/sweeps/demo.yaml

train: setup $(DEMO_DATA)/annotations/instances_val2014.json
	$(VENV)/bin/q2l train --config experiments/demo.yaml

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup-dev lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

bench: setup $(DEMO_DATA)/annotations/instances_val2014.json
	$(VENV)/bin/q2l bench

clean:
	rm -rf results .pytest_cache .ruff_cache
