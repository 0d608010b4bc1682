# cnnexp — every target installs what it needs first (a local virtualenv in .venv).
# `make help` lists the targets.

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
SWEEP   ?= seed_questions
WORKERS ?= 1
ARGS    ?=
PORT    ?= 5000
MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
STORAGE ?= sqlite:///studies.db
DASHBOARD_PORT ?= 8080
# `make ui` / `make dashboard` show the most recent study; with SWEEP=name given, that sweep's study.
UI_STUDY = $(if $(filter-out file,$(origin SWEEP)),--sweep $(SWEEP))
PYTEST_ARGS ?=
MLFLOW_SERVER_STORE ?= sqlite:///mlflow-server.db
MLFLOW_SERVER_ARTIFACTS ?= mlartifacts-server

.DEFAULT_GOAL := help
.PHONY: help install run sweep report ui dashboard mlflow-server services test test-fast test-slow lint bench clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv and install cnnexp (editable) with its dev and cluster extras

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[tf,dev,cluster]"
	@touch $(STAMP)

# A second environment with JAX and without TensorFlow: what GPU machines often have. The tests
# run a sweep in it (tests/test_jax.py), so that nothing in cnnexp needs TensorFlow on that path.
JAX_VENV ?= .venv-jax
JAX_STAMP := $(JAX_VENV)/.installed-stamp
$(JAX_STAMP): pyproject.toml
	$(PYTHON) -m venv $(JAX_VENV)
	$(JAX_VENV)/bin/python -m pip install -q --upgrade pip
	$(JAX_VENV)/bin/python -m pip install -q -e ".[jax]"
	@! $(JAX_VENV)/bin/python -c "import tensorflow" 2>/dev/null || { echo "$(JAX_VENV) must not have TensorFlow"; exit 1; }
	@touch $(JAX_STAMP)

run: install ## One experiment, e.g. make run ARGS='+kernel=7 train.epochs=1'
	$(PY) -m cnnexp.run $(ARGS)

sweep: install ## The main job: an Optuna study from sweeps/$(SWEEP).yaml, e.g. make sweep SWEEP=quick
	$(PY) -m cnnexp.sweep --sweep $(SWEEP) sweep.workers=$(WORKERS) $(ARGS)

report: install ## Tables and plots for a study: make report SWEEP=quick
	$(PY) -m cnnexp.report $(SWEEP) $(ARGS)

ui: install ## The MLflow UI on http://127.0.0.1:$(PORT) over the runs' store; prints first the URL of the latest study's runs
	$(PY) -m cnnexp.ui mlflow --tracking-uri $(MLFLOW_TRACKING_URI) --port $(PORT) $(UI_STUDY)

dashboard: install ## optuna-dashboard on http://127.0.0.1:$(DASHBOARD_PORT) over the studies (STORAGE); prints the study's page first
	$(PY) -m cnnexp.ui dashboard --storage $(STORAGE) --port $(DASHBOARD_PORT) $(UI_STUDY)

test: install $(JAX_STAMP) ## The tests CI runs: offline, real training on small subsets; cluster tests skip without their services
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-fast: install $(JAX_STAMP) ## Only the fast tier (no multi-worker, server or Slurm tests)
	$(PY) -m pytest -m "not slow and not cluster" $(PYTEST_ARGS)

services: ## Start PostgreSQL and a one-node Slurm cluster on loopback for the cluster tests (root): eval "$$(make -s services)"
	@bash .ci/services.sh

test-slow: install ## The slow tier: longer end-to-end runs
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

mlflow-server: install ## An MLflow tracking server on 127.0.0.1:$(PORT) with a database backend and artifact root
	$(VENV)/bin/mlflow server --backend-store-uri $(MLFLOW_SERVER_STORE) --artifacts-destination $(MLFLOW_SERVER_ARTIFACTS) \
		--host 127.0.0.1 --port $(PORT)

bench: install ## Benchmarks side by side (ours vs bare Keras, overhead, pruning, data; FULL=1 adds memory and workers): outputs/bench/
	$(PY) benchmarks/bench.py $(if $(FULL),--full) $(ARGS)

lint: install ## ruff
	$(VENV)/bin/ruff check cnnexp tests

clean: ## Remove outputs, local stores and caches (not the virtualenv, not staged data)
	rm -rf outputs multirun mlruns mlartifacts mlartifacts-server mlflow.db mlflow-server.db studies.db studies.db.cnnexp-lock .pytest_cache .ruff_cache
