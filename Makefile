# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SCALELAB := $(VENV)/bin/scalelab
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | sha1sum | cut -c1-12)
INSTALLER ?= uv
PYTEST_ARGS ?=

# Python run by these targets caches the bytecode of what it imports (this machine sets
# PYTHONDONTWRITEBYTECODE=1 for every process, which makes each start recompile whatever
# `make setup` did not byte-compile ahead: see tools/bytecode.py).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup lock lock-check bytecode-list system-deps demo down test test-unit test-integration lint format bench repro clean

# Installs requirements.lock (every pin hashed; torch the CPU build) with uv, which pip bootstraps
# from the lock; `make setup INSTALLER=pip` installs the same lock with pip alone (slower).
$(STAMP): pyproject.toml requirements.lock
	@echo "installing requirements.lock and scalelab into $(VENV) with $(INSTALLER)"
	VENV=$(VENV) tools/deps.sh setup $(INSTALLER)
	@$(PY) -c "import scalelab, torch, ray, mlflow, dvc; assert torch.version.cuda is None, 'a CUDA torch'" \
	  || (echo "install failed"; exit 1)
	@# the model table's parameter and FLOP counts (torch builds every variant: ~3 s), computed once
	@# here so that `scalelab models variants` answers from its cache (models/summary.py) in ~0.2 s
	@$(VENV)/bin/scalelab models variants >/dev/null
	@rm -f $(VENV)/.installed-*; touch $@

setup: $(STAMP) system-deps

# Re-resolve pyproject.toml into requirements.lock (existing pins kept where they still fit; to move
# one: delete its lines first). lock-check: the lock still matches pyproject.toml (CI runs it).
lock:
	VENV=$(VENV) tools/deps.sh lock

lock-check:
	VENV=$(VENV) tools/deps.sh lock-check

# After `make lock` and `make setup`: re-record which site-packages directories setup byte-compiles
# (tools/bytecode-dirs.txt; tests/unit/test_bytecode.py fails when scalelab imports from one it lacks).
bytecode-list: setup
	VENV=$(VENV) tools/deps.sh bytecode-list

# Debian packages: the Fashion-MNIST dataset (benchmarks), Chromium (browser tests) and the compiled
# HTTP load generators hey and wrk (serving benchmark and load tests).
# Best effort: skipped where apt is unavailable; nothing in `make test` requires the dataset.
system-deps:
	@if [ -d /usr/share/datasets/fashion-mnist ] && command -v chromium >/dev/null && command -v hey >/dev/null && command -v wrk >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian packages: dataset-fashion-mnist chromium hey wrk"; \
	  (apt-get install -y -qq dataset-fashion-mnist chromium hey wrk >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist chromium hey wrk >/dev/null 2>&1)) \
	   || echo "warning: apt could not install dataset-fashion-mnist/chromium/hey/wrk; benchmarks and browser tests need them"; \
	else echo "note: install Debian packages dataset-fashion-mnist and chromium for benchmarks and browser tests"; fi

# The whole pipeline on the embedded default: DVC data, Tune search, training, registry, promotion,
# Ray Serve (left running on a local Ray head: `make down` or `scalelab down` stops it), report.
demo: setup
	$(SCALELAB) pipeline run pipelines/digits.yaml
	@echo
	@echo "see the runs, the search and the registry: $(SCALELAB) ui   (MLflow UI on 127.0.0.1; Ctrl-C stops it)"
	@echo "the Ray head with the served model keeps running (~0.2 of a core when idle); stop it with: make down"

down: setup
	$(SCALELAB) down

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: setup
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check platform tests benchmarks
	$(VENV)/bin/ruff format --check platform tests benchmarks

format: setup
	$(VENV)/bin/ruff format platform tests benchmarks
	$(VENV)/bin/ruff check --fix platform tests benchmarks

# Benchmarks write benchmarks/results/<name>.json; BENCHMARKS.md quotes them.
bench: setup
	$(PY) benchmarks/digits.py
	$(PY) benchmarks/loader.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/tune.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/ingress.py
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/detection.py

# The DVC pipeline (prepare -> train -> evaluate); its stages call the scalelab verbs.
repro: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro

clean:
	rm -rf .scalelab outputs reports
