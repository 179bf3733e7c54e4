# rlhf-jobs: SFT -> reward model -> PPO on Ray Train, locally or on Kubernetes (KubeRay).
# `make help` lists the targets. Variables can be overridden: make deploy-ppo NAMESPACE=ml RUN=exp1

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

NAMESPACE ?= rlhf
RUN ?= default
KIND_CLUSTER ?= rlhf-jobs
IMAGE_REPO ?= rlhf-jobs
IMAGE_TAG ?= 0.1.0
KUBERAY_VERSION ?= 1.7.0
DEMO_DIR ?= runs/demo

.DEFAULT_GOAL := help

##@ General

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make \033[36m<target>\033[0m [VAR=value ...]\n"} \
	  /^[a-zA-Z0-9_-]+:.*?##/ { printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Local

$(BIN)/rlhf-jobs: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

.PHONY: venv
venv: $(BIN)/rlhf-jobs ## Create .venv with the package and dev tools (CPU torch 2.13.0)

.PHONY: demo
demo: venv ## Run SFT -> RM -> PPO locally on a tiny model (in-process Ray) into runs/demo
	$(BIN)/rlhf-jobs pipeline --backend local --workdir $(DEMO_DIR) --tiny-model

.PHONY: test
test: venv ## Run the test suite (docker/kind tests skip where there is no engine/cluster)
	$(BIN)/pytest

.PHONY: test-fast
test-fast: venv ## Run the tests that need no Ray run, Docker or cluster
	$(BIN)/pytest -m "not slow and not docker and not kind"

.PHONY: lint
lint: venv ## ruff
	$(BIN)/ruff check rlhf_jobs tests bench

.PHONY: bench
bench: venv ## Benchmarks against TRL (installs the bench extra: trl==1.12.0)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run_all.py

.PHONY: clean
clean: ## Remove runs/ and caches (keeps .venv)
	rm -rf runs .pytest_cache .ruff_cache
