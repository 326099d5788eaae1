# syntax=docker/dockerfile:1
# ngguard demo server (Gradio). CPU image by default; GPU image with --build-arg VARIANT=gpu.
#
#   docker build -t ngguard .                                  # CPU (python:3.11-slim)
#   docker build -t ngguard:gpu --build-arg VARIANT=gpu .      # GPU (CUDA runtime base, onnxruntime-gpu)
#   docker run --rm -p 7860:7860 ngguard                       # http://127.0.0.1:7860/
#   docker run --rm --gpus all -p 7860:7860 -e NGGUARD_AUTH=user:pass ngguard:gpu
#
# Install steps are the README's: torch pinned first, then the package with its extras.
# TORCH_INDEX_URL (optional), e.g. https://download.pytorch.org/whl/cpu, keeps the CPU image small
# where that index is reachable; the default uses the normal package index.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---- base images: a Python with a venv at /opt/venv ------------------------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
RUN python -m venv /opt/venv
ENV NGGUARD_EXTRAS=ui,onnx

FROM ${CUDA_IMAGE} AS base-gpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
# onnxruntime-gpu shares the module name with onnxruntime: only one of them is installed
ENV NGGUARD_EXTRAS=ui,onnx-gpu

# ---- the image ---------------------------------------------------------------------------------------
FROM base-${VARIANT}
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /app
# torch first, in its own layer (the slow, large one; changes to the code do not rebuild it)
RUN pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
COPY pyproject.toml README.md ./
COPY ngguard ./ngguard
COPY serve ./serve
# folders written through mkdtemp (e.g. the organism checkpoint) are 0700: make /app readable
RUN pip install ".[${NGGUARD_EXTRAS}]" && chmod -R a+rX /app

# import ngguard and serve/ (with the bundled organism checkpoint and its patch) from the source tree
ENV PYTHONPATH=/app

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin ngguard
USER ngguard
WORKDIR /home/ngguard
ENV NGGUARD_CACHE=/home/ngguard/.cache/ngguard

EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=4)" || exit 1
CMD ["ngguard", "serve", "--host", "0.0.0.0", "--port", "7860"]
