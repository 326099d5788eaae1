# ngguard demo server (Gradio). CPU image by default; GPU image with --build-arg VARIANT=gpu.
#
#   docker build -t ngguard .                                  # CPU: python:3.11-slim + CPU torch wheels
#   docker build -t ngguard:gpu --build-arg VARIANT=gpu .      # GPU: CUDA 13.0 base + PyPI torch (CUDA 13.0)
#   docker run --rm -p 7860:7860 ngguard                       # http://127.0.0.1:7860/
#   docker run --rm --gpus all -p 7860:7860 -e NGGUARD_AUTH=user:pass ngguard:gpu
#
# Build arguments (all optional):
#   PYTHON_IMAGE, CUDA_IMAGE   base images (any image with python3 >= 3.11 and python3-venv, or apt)
#   TORCH_VERSION              2.13.0
#   TORCH_INDEX_URL            where torch comes from; default per variant: the CPU wheel index
#                              (https://download.pytorch.org/whl/cpu, torch==X+cpu, ~200 MB instead of
#                              ~2.6 GB of CUDA wheels) / PyPI for the GPU variant (its Linux wheels
#                              bring CUDA 13.0, matching CUDA_IMAGE). For another CUDA pass both, e.g.
#                              CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04
#                              TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# Dependencies are pinned by docker/constraints.txt and installed in their own layers before the
# code is copied: a code change rebuilds only the last, small layers.
# No "syntax" directive: the classic builder and BuildKit both build this file without fetching a
# frontend image (builds without access to an image registry work).

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# ---- base images: a Python with a venv at /opt/venv ------------------------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
RUN python3 -m venv /opt/venv
ENV NGGUARD_EXTRAS=ui,onnx \
    TORCH_INDEX_DEFAULT=https://download.pytorch.org/whl/cpu \
    TORCH_LOCAL_VERSION=+cpu

FROM ${CUDA_IMAGE} AS base-gpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
# the LM runs on the GPU through torch; the optional ONNX vision path uses onnxruntime's CPU build
# (onnxruntime-gpu wheels target CUDA 12, torch here brings CUDA 13: never mix the two in one image)
ENV NGGUARD_EXTRAS=ui,onnx \
    TORCH_INDEX_DEFAULT=https://pypi.org/simple \
    TORCH_LOCAL_VERSION=

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
COPY docker/constraints.txt /tmp/constraints.txt
# 1. torch, alone (the large layer); its own dependencies from PyPI, pinned
RUN pip install --index-url "${TORCH_INDEX_URL:-$TORCH_INDEX_DEFAULT}" --extra-index-url https://pypi.org/simple \
        -c /tmp/constraints.txt "torch==${TORCH_VERSION}${TORCH_LOCAL_VERSION}"
# 2. the other dependencies, read from pyproject.toml (dependencies + the variant's extras), pinned
COPY pyproject.toml ./
RUN python3 -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [d for e in sys.argv[1].split(',') for d in p['optional-dependencies'][e]]; \
print('\n'.join(d for d in p['dependencies'] + extras if not d.startswith('torch')))" "$NGGUARD_EXTRAS" \
        > /tmp/requirements.txt \
    && pip install -c /tmp/constraints.txt -r /tmp/requirements.txt
# 3. the code (with the bundled organism checkpoint and its patch); no dependency is resolved here
COPY README.md ./
COPY ngguard ./ngguard
COPY serve ./serve
# folders written through mkdtemp (e.g. the organism checkpoint) are 0700: make /app readable
RUN pip install --no-deps . && chmod -R a+rX /app

# import ngguard and serve/ from the source tree
ENV PYTHONPATH=/app

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin ngguard
USER ngguard
WORKDIR /home/ngguard
ENV NGGUARD_CACHE=/home/ngguard/.cache/ngguard

EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=4)" || exit 1
CMD ["ngguard", "serve", "--host", "0.0.0.0", "--port", "7860"]
