# mammo-node developer entry points. `make test` is what CI runs (.ci/run).
# Everything runs from the project's .venv, which `make install` creates or updates
# (tools/install.sh: Debian packages, .venv, torch 2.13.0 first, then the project; idempotent).

VENV   := .venv
PYTHON := $(VENV)/bin/python
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="tests/unit -x"`
PYTEST_ARGS ?=
# Tests run on two pytest-xdist workers; tests/faults stays on one of them, in order, and each
# integration module stays whole on one (tests/conftest.py groups them).
# `make test PYTEST_WORKERS=0` runs everything in one process.
PYTEST_WORKERS ?= 2

.PHONY: install test demo lint bench train clean

install:
	bash tools/install.sh

test: install
	$(PYTHON) -m pytest -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadgroup --durations=25 $(PYTEST_ARGS)

demo: install
	$(PYTHON) -m tools.demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

bench: install
	$(PYTHON) -m tools.bench.receive
	$(PYTHON) -m tools.bench.e2e
	$(PYTHON) -m tools.bench.throughput

train: install
	$(PYTHON) -m tools.model.train --mias ../shared/data/mias --out build/train/mias-unet-384 --arch unet --size 384 --patch 64 --cv 5 --epochs 40 --min-epochs 20 --val-every 20 --patience 0 --threads 2
	$(PYTHON) -m tools.model.export build/train/mias-unet-384 --out models/mias-baseline --name mias-baseline --version 0.2.1 --notes models/mias-baseline/experiments.md --threads 2

clean:
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info .demo .bench
