# syntax=docker/dockerfile:1
#
# The varlide worker image: Dask workers (CPU and GPU), Prefect flow runs (the process worker
# of infra/compose.yaml, Kubernetes jobs of infra/k8s-gpu-job-template.json) and the MLflow and
# Prefect servers of infra/compose.yaml. One image everywhere, so the Prefect, MLflow, Dask and
# torch versions of clients, servers and workers always match.
#
# Build from the repository root (the context; infra/worker.Dockerfile.dockerignore keeps
# it to the package sources):
#   docker build -f infra/worker.Dockerfile -t varlide-worker:latest .
#
# Base image: python:3.11-slim-bookworm plus the torch wheels pinned in pyproject.toml, not a
# pytorch/pytorch or nvidia/cuda image. torch 2.14.1 on PyPI for Linux x86_64 is a CUDA 13.0
# build that brings its CUDA runtime, cuDNN, cuBLAS and NCCL as nvidia-* wheels, so the image
# is CUDA-capable as it is; the GPU host needs only the NVIDIA driver (>= 580 for CUDA 13) and
# the NVIDIA Container Toolkit. This keeps exactly the pinned torch (a pytorch/pytorch image
# ships its own torch and Python, which pip would replace or shadow) and the project's Python
# 3.11. A smaller CPU-only image: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=""

# tini: a real PID 1 (signals reach dask/prefect, zombies reaped). libgl1/libglib2.0-0: OpenCV
# (pulled in by pyiqa's dependencies) needs them even when nothing is displayed.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 1000 varlide \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/sh varlide \
    && mkdir -p /cache \
    && chown varlide:varlide /cache

# Offline by default: weights come from the mirror (see worker-entrypoint.sh), never from a
# hub in the middle of a run. The caches live under /cache (a volume in compose, an emptyDir
# or a PVC in Kubernetes), where `varlide weights sync` puts each file.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch \
    VARLIDE_WEIGHTS_CACHE=/cache/varlide \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    MLFLOW_DISABLE_TELEMETRY=true

WORKDIR /opt/varlide

# torch first, in its own layer (the largest one): the same pins as pyproject.toml's
# dependencies (tests/test_infra.py checks they agree), so `pip install .` keeps them.
RUN if [ -n "$TORCH_INDEX_URL" ]; then set -- --index-url "$TORCH_INDEX_URL"; fi \
    && pip install "$@" "torch==2.14.1" "torchvision==0.29.1"

# The project (varlide, flows, tasks: one distribution) plus what the servers of the compose
# stack need beyond it: psycopg2 (MLflow's Postgres backend store), boto3 (MLflow's S3
# artifact proxy) and bokeh (the Dask dashboard). The sources stay in /opt/varlide: Prefect
# deployments load their entrypoints (flows/enhance.py:enhance_flow ...) from here.
COPY pyproject.toml README.md LICENSE ./
COPY varlide ./varlide
COPY flows ./flows
COPY tasks ./tasks
RUN pip install . "psycopg2-binary>=2.9" "boto3>=1.34" "bokeh>=3.1" \
    && rm -rf build ./*.egg-info \
    && python -c "import torch, varlide; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

COPY --chmod=0755 infra/worker-entrypoint.sh /usr/local/bin/varlide-entrypoint

USER 1000:1000

ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/varlide-entrypoint"]
CMD ["varlide", "--help"]
