# Trainer images (images/Dockerfile). Included by the top-level Makefile: `include images/images.mk`.
#   make images                                          CPU image $(IMAGE_REPO):$(IMAGE_TAG)
#   make images VARIANT=gpu                              CUDA torch (PyPI's default wheel), tag $(IMAGE_TAG)-gpu
#   make images BASE_IMAGE=local/python:3.11-slim-bookworm   (this machine, after ../shared/tools/start-docker)

# IMAGE_REPO and IMAGE_TAG come from the top-level Makefile.
VARIANT ?= cpu
DOCKER ?= docker
# Base image: an exact Python 3.11 for both variants (RLHF_BASE_IMAGE is what CI exports). The GPU variant needs no
# CUDA base: PyPI's torch wheel brings the CUDA runtime, cuDNN and NCCL; the node's driver is mounted at run time.
CPU_BASE_IMAGE ?= $(or $(RLHF_BASE_IMAGE),python:3.11-slim-bookworm)
GPU_BASE_IMAGE ?= $(CPU_BASE_IMAGE)
PIP_INDEX_URL ?= https://pypi.org/simple
# Where torch comes from when no local wheel is found (see TORCH_WHEELS_DIR): the CPU index, or PyPI (CUDA).
CPU_TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
GPU_TORCH_INDEX_URL ?= $(PIP_INDEX_URL)
# helm copied into the image for the in-cluster runner (empty: the Dockerfile downloads HELM_VERSION).
HELM_BIN ?= $(shell command -v helm 2>/dev/null)
PIP_EXTRA_INDEX_URL ?=
# A CA bundle for TLS-intercepting proxies, given to the build as a secret (never in a layer).
EXTRA_CA_CERT ?=
# A local dir holding torch-<pin>+cpu wheels (default: pip's find-links, e.g. /opt/wheels here).
ifndef TORCH_WHEELS_DIR
TORCH_WHEELS_DIR := $(firstword $(wildcard $(PIP_FIND_LINKS) $(shell pip3 config get global.find-links 2>/dev/null)))
endif

ifeq ($(VARIANT),gpu)
BASE_IMAGE ?= $(GPU_BASE_IMAGE)
TORCH_INDEX_URL ?= $(GPU_TORCH_INDEX_URL)
IMAGE ?= $(IMAGE_REPO):$(IMAGE_TAG)-gpu
else ifeq ($(VARIANT),cpu)
BASE_IMAGE ?= $(CPU_BASE_IMAGE)
TORCH_INDEX_URL ?= $(CPU_TORCH_INDEX_URL)
IMAGE ?= $(IMAGE_REPO):$(IMAGE_TAG)
else
$(error VARIANT must be cpu or gpu, not "$(VARIANT)")
endif

comma := ,
TORCH_VERSION := $(shell sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)
# The Dockerfile needs BuildKit (RUN --mount, secrets): `docker buildx build` where the client has buildx,
# else a client with BuildKit built in (Docker < 23, e.g. Debian's docker.io at /usr/bin/docker).
ifndef DOCKER_BUILD
DOCKER_BUILD := $(shell \
  if $(DOCKER) buildx version >/dev/null 2>&1; then echo "$(DOCKER) buildx build --load"; exit 0; fi; \
  for d in $(DOCKER) /usr/bin/docker; do \
    case "$$($$d version --format '{{.Client.Version}}' 2>/dev/null)" in \
      (18.*|19.*|20.*|21.*|22.*) echo "DOCKER_BUILDKIT=1 $$d build"; exit 0;; esac; \
  done; echo "DOCKER_BUILDKIT=1 $(DOCKER) build")
endif

##@ Images

.PHONY: images
images: images-wheels ## Build the trainer image IMAGE_REPO:IMAGE_TAG (VARIANT=gpu: CUDA torch, tag -gpu)
	$(DOCKER_BUILD) -f images/Dockerfile -t $(IMAGE) \
	  --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	  --build-arg VARIANT=$(VARIANT) \
	  --build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL) \
	  --build-arg PIP_INDEX_URL=$(PIP_INDEX_URL) \
	  --build-arg PIP_EXTRA_INDEX_URL=$(PIP_EXTRA_INDEX_URL) \
	  $(if $(EXTRA_CA_CERT),--secret id=extra_ca$(comma)src=$(abspath $(EXTRA_CA_CERT))) \
	  .
	@$(DOCKER) image ls $(IMAGE)

# images/.wheels/ (git-ignored) feeds the Dockerfile's `wheels` stage: a hard link to the local torch CPU wheel, or nothing.
.PHONY: images-wheels
images-wheels:
	@mkdir -p images/.wheels && rm -f images/.wheels/*.whl
	@if [ "$(VARIANT)" = cpu ] && [ -n "$(TORCH_WHEELS_DIR)" ]; then \
	  for w in $(TORCH_WHEELS_DIR)/torch-$(TORCH_VERSION)+cpu-cp311-*.whl; do \
	    [ -f "$$w" ] || continue; ln -f "$$w" images/.wheels/ 2>/dev/null || cp "$$w" images/.wheels/; \
	    echo "torch: $$w"; \
	  done; \
	fi
	@mkdir -p images/.tools && rm -f images/.tools/helm
	@if [ -n "$(HELM_BIN)" ]; then ln -f "$(HELM_BIN)" images/.tools/helm 2>/dev/null || cp "$(HELM_BIN)" images/.tools/helm; \
	  echo "helm: $(HELM_BIN)"; fi

.PHONY: test-docker
test-docker: venv ## Run the Docker tests: build the image, SFT through `ray job submit` on 3 containers
	$(BIN)/pytest -m docker

.PHONY: test-docker-gpu
test-docker-gpu: venv ## Build the GPU image (about 6.5 GB) and check it: CUDA torch, NCCL, uid 1000
	RLHF_BUILD_GPU_IMAGE=1 $(BIN)/pytest -m docker -k gpu tests/test_images.py
