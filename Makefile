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
	$(PYTHON) -m tools.model.cells extract --mias ../shared/data/mias --out build/cells/lite0 --arch efficientnet-lite0 --threads 2
	$(PYTHON) -m tools.model.cells nested --features build/cells/lite0 --out build/cells/nested --threads 2
	$(PYTHON) -m tools.model.cells final --nested build/cells/nested/nested.json --out build/cells/bundle-0.5.0 --mias ../shared/data/mias --space contralateral --name mias-baseline --version 0.5.0 --notes models/mias-baseline/experiments.md --threads 2
	for n in 0 1 2; do $(PYTHON) -m tools.model.topfit --features build/cells/lite0 --out build/cells/e1-r$$n --bundle build/cells/bundle-0.5.0 --train all --recipes inner --repeat $$n --mias ../shared/data/mias --threads 2 || exit 1; done
	$(PYTHON) -m tools.model.topfit --features build/cells/lite0 --out build/cells/e1-final --bundle build/cells/bundle-0.5.0 --train all --final --mias ../shared/data/mias --threads 2
	$(PYTHON) -m tools.model.cells extract --mias ../shared/data/mias --out build/cells/e1 --arch efficientnet-lite0 --threads 2 --trunk build/cells/e1-final/trunk.pt
	$(PYTHON) -m tools.model.tuned --features build/cells/e1 --trunk build/cells/e1-final --outer build/cells/e1-r0/topfit.json build/cells/e1-r1/topfit.json build/cells/e1-r2/topfit.json --base build/cells/bundle-0.5.0 --mias ../shared/data/mias --out build/cells/bundle-0.6.1 --version 0.6.1 --notes models/mias-baseline/experiments.md --threads 2
	@echo "bundle in build/cells/bundle-0.6.1: compare its card with models/mias-baseline, then copy it there to ship it"

clean:
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info .demo .bench
