# cnnexp — every target installs what it needs first (a local virtualenv in .venv).
# `make help` lists the targets.

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
# Offline installs (make wheels, then make install OFFLINE=1 where no index is reachable): the wheel folder, its
# target Python and platform (this machine's by default), and JAX=cpu (jax[cpu] among the wheels) or JAX=system
# (the target's own JAX, e.g. with CUDA: kept out of the wheels, pinned at install, never replaced); WHEELS_CONSTRAINTS:
# versions the target keeps (`python3 tools/wheelhouse.py pins` there), for wheels that fit them.
WHEELS  ?= wheels
WHEELS_PYTHON   ?= $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
WHEELS_PLATFORM ?= $(shell $(PYTHON) tools/wheelhouse.py platform)
JAX     ?= cpu
WHEELS_CONSTRAINTS ?=
OFFLINE ?=
OFFLINE_PIP_ARGS ?=
WHEELS_STAMP = $(WHEELS)/.complete-py$(WHEELS_PYTHON)-$(WHEELS_PLATFORM)-jax-$(JAX)
STAMP   := $(VENV)/.installed$(if $(filter 1,$(OFFLINE)),-offline-jax-$(JAX))-stamp
SWEEP   ?= seed_questions
WORKERS ?= 1
ARGS    ?=
# Unset, the CLIs' own defaults apply (one home each: cnnexp/study/settings.py, conf/tracking/, cnnexp/ui.py).
PORT    ?=
STORAGE ?=
DASHBOARD_PORT ?=
# `make ui` / `make dashboard` show the most recent study; with SWEEP=name given, that sweep's study.
UI_STUDY = $(if $(filter-out file,$(origin SWEEP)),--sweep $(SWEEP))
PYTEST_ARGS ?=
# Test processes (pytest-xdist): two use both cores here, since much of a test is one-threaded Python (tracing,
# MLflow, SQLite, process starts). TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= 2
MLFLOW_SERVER_STORE ?= sqlite:///mlflow-server.db
MLFLOW_SERVER_ARTIFACTS ?= mlartifacts-server

.DEFAULT_GOAL := help
.PHONY: help install wheels run sweep report ui dashboard mlflow-server services test test-fast test-slow lint bench clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv and install cnnexp (editable) with its tf, dev and cluster extras; OFFLINE=1: from wheels/ alone (JAX=cpu|system)

ifeq ($(OFFLINE),1)
$(STAMP): pyproject.toml $(wildcard $(WHEELS)/cnnexp-*.whl)
	$(PYTHON) -m venv $(if $(filter system,$(JAX)),--system-site-packages) $(VENV)
	$(PYTHON) tools/wheelhouse.py install --venv $(VENV) --wheels $(WHEELS) --jax $(JAX) --pip-args='$(OFFLINE_PIP_ARGS)'
	@touch $(STAMP)
else
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[tf,dev,cluster]"
	@touch $(STAMP)
endif

wheels: $(WHEELS_STAMP) $(WHEELS)/.cnnexp-stamp ## Every dependency and cnnexp as wheels in wheels/ for WHEELS_PYTHON, WHEELS_PLATFORM (this machine's); JAX=system leaves JAX out

$(WHEELS_STAMP): pyproject.toml tools/wheelhouse.py $(WHEELS_CONSTRAINTS)
	$(PYTHON) tools/wheelhouse.py download --dest $(WHEELS) --python $(WHEELS_PYTHON) --platform $(WHEELS_PLATFORM) \
		--jax $(JAX) $(if $(WHEELS_CONSTRAINTS),--constraint $(WHEELS_CONSTRAINTS))
	@touch $@ $(WHEELS)/.cnnexp-stamp

# cnnexp's own wheel again when its code, configs or sweeps change (its dependencies are what pyproject.toml says).
$(WHEELS)/.cnnexp-stamp: $(wildcard cnnexp/*.py cnnexp/*/*.py conf/*.yaml conf/*/*.yaml sweeps/*.yaml) | $(WHEELS_STAMP)
	$(PYTHON) tools/wheelhouse.py project --dest $(WHEELS)
	@touch $@

run: install ## One experiment, e.g. make run ARGS='+kernel=7 train.epochs=1'
	$(PY) -m cnnexp.run $(ARGS)

sweep: install ## The main job: an Optuna study from sweeps/$(SWEEP).yaml, e.g. make sweep SWEEP=quick
	$(PY) -m cnnexp.sweep --sweep $(SWEEP) sweep.workers=$(WORKERS) $(ARGS)

report: install ## Tables and plots for a study: make report SWEEP=quick
	$(PY) -m cnnexp.report $(SWEEP) $(ARGS)

ui: install ## The MLflow UI on http://127.0.0.1:$(PORT) over the runs' store; prints first the URL of the latest study's runs
	$(PY) -m cnnexp.ui mlflow $(if $(PORT),--port $(PORT)) $(UI_STUDY)

dashboard: install ## optuna-dashboard on http://127.0.0.1:$(DASHBOARD_PORT) over the studies (STORAGE); prints the study's page first
	$(PY) -m cnnexp.ui dashboard $(if $(STORAGE),--storage $(STORAGE)) $(if $(DASHBOARD_PORT),--port $(DASHBOARD_PORT)) \
		$(UI_STUDY)

test: install wheels ## The tests CI runs: offline, real training on small subsets; cluster tests skip without their services
	$(PY) -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadgroup --durations=15 $(PYTEST_ARGS)

test-fast: install wheels ## Only the fast tier (no multi-worker, server or Slurm tests)
	$(PY) -m pytest -m "not slow and not cluster" $(PYTEST_ARGS)

services: ## Start PostgreSQL and a one-node Slurm cluster on loopback for the cluster tests (root): eval "$$(make -s services)"
	@bash .ci/services.sh

test-slow: install ## The slow tier: longer end-to-end runs
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

mlflow-server: install ## An MLflow tracking server on 127.0.0.1:$(PORT) with a database backend and artifact root
	MLFLOW_DISABLE_TELEMETRY=$${MLFLOW_DISABLE_TELEMETRY:-true} $(VENV)/bin/mlflow server --backend-store-uri $(MLFLOW_SERVER_STORE) --artifacts-destination $(MLFLOW_SERVER_ARTIFACTS) \
		--host 127.0.0.1 --port $(or $(PORT),5000)

bench: install ## Benchmarks side by side (ours vs bare Keras, overhead, pruning, data; FULL=1 adds memory and workers): outputs/bench/
	$(PY) benchmarks/bench.py $(if $(FULL),--full) $(ARGS)

lint: install ## ruff
	$(VENV)/bin/ruff check cnnexp tests tools

clean: ## Remove outputs, local stores and caches (not the virtualenv, not staged data)
	rm -rf outputs multirun mlruns mlartifacts mlartifacts-server mlflow.db mlflow-server.db studies.db studies.db.cnnexp-lock .pytest_cache .ruff_cache
