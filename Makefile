# The two commands a newcomer needs are `make dev` and `make test`; both set up
# whatever is missing first. Build outputs are cached outside the repository in
# $(MEP_CACHE) (default ~/.cache/modelendpoint), Python packages in .venv/.
SHELL := /bin/bash
.DEFAULT_GOAL := help

export MEP_CACHE ?= $(HOME)/.cache/modelendpoint
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: help setup dataplane testbed images embedded-model node-deps cluster cluster-down dev dev-down \
        lint test test-unit test-integration test-e2e bench-runtime bench-gateway bench-autoscale bench-operator conformance crds lock

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

setup: ## install everything into .venv/ (pinned; cached; idempotent), the gateway's data plane included
	@hack/setup.sh

# setup builds it too; this is the quick loop while editing gateway/dataplane.
dataplane: ## cargo build --release --locked of gateway/dataplane into .venv/bin (target dir in the cache)
	@hack/dataplane.sh

testbed: ## build etcd, kube-*, kubectl, kwok, kwokctl and helm from Go modules into the cache
	@hack/build-testbed.sh >/dev/null

images: setup testbed ## build the operator and runtime images from their Dockerfiles with buildah (cached by content)
	@$(PY) hack/images/build.py

embedded-model: setup ## convert the embedded SmolLM2 model once; prints its folder last
	@$(PY) hack/embedded_model.py

node-deps: ## the official openai npm package, for the JavaScript client tests
	@hack/node-deps.sh

cluster: setup testbed ## start the local control plane; prints KUBECONFIG and PATH exports last
	@$(PY) hack/localcluster.py up

cluster-down: ## stop the local control plane
	@$(PY) hack/localcluster.py down

dev: setup testbed embedded-model ## the whole system on the embedded model, until Ctrl-C
	@$(PY) hack/dev.py

dev-down: ## stop a `make dev` running in another shell
	@$(PY) hack/dev.py --down

lint: setup ## ruff over the code and tests, mypy over the three packages (seconds; make test runs it first)
	@$(VENV)/bin/ruff check operator runtime gateway hack tests
	@$(VENV)/bin/mypy

test: setup testbed embedded-model node-deps lint ## lint, then the whole suite: unit, integration, e2e
	@$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup ## unit tests only (seconds; with the data plane's cargo test)
	@$(PY) -m pytest -m unit $(PYTEST_ARGS)

test-integration: setup testbed embedded-model node-deps ## integration tests only
	@$(PY) -m pytest -m integration $(PYTEST_ARGS)

test-e2e: setup testbed embedded-model node-deps ## end-to-end tests only
	@$(PY) -m pytest -m e2e $(PYTEST_ARGS)

bench-runtime: setup embedded-model ## this runtime against vLLM's own OpenAI server, side by side
	@$(PY) hack/bench_runtime.py

bench-gateway: setup testbed ## the gateway against direct and vllm-router at 64, 256 and 1,024 streams
	@$(PY) hack/bench_gateway.py

bench-autoscale: setup testbed embedded-model ## one autoscaled ModelEndpoint through the gateway: idle, wake, ramp, plateau, stop
	@$(PY) hack/bench_autoscale.py

bench-operator: setup testbed ## 1,000 ModelEndpoints on the local control plane
	@$(PY) hack/bench_operator.py

conformance: setup embedded-model node-deps ## rerun the conformance set and rewrite docs/conformance.md from its outcomes
	@$(PY) -m pytest -m conformance --conformance-write $(PYTEST_ARGS)

crds: setup ## regenerate crds/modelendpoints.yaml and docs/operator.md's field table from the typed models
	@$(PY) -m modelendpoint_operator.crd crds/modelendpoints.yaml docs/operator.md

lock: setup ## recompile the pinned requirement files after changing a dependency
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" hack/lock.sh
