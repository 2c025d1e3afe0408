# syntax=docker/dockerfile:1
# Dreamline image: one image for the Airflow components (api-server, scheduler,
# dag-processor, triggerer), the MLflow server, and the GPU step pods that
# KubernetesPodOperator starts as `python -m sd_tasks <step> --flags...`.
#
# Base: python:3.11-slim-bookworm, not nvidia/cuda: the CUDA torch wheels bundle
# CUDA runtime/cuDNN/NCCL as nvidia-* pip packages, so GPU nodes only need the
# host driver (injected by the NVIDIA container toolkit / device plugin). It is
# the exact Python 3.11 constraints.txt was locked for, and smaller.
#
# Build context: the repo's .dockerignore (to be added) must exclude at least
# .venv/ and .dreamline/ (local state), plus .git/ and caches.
FROM python:3.11-slim-bookworm

# cu128 by default; build a CPU image with
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# git: DVC shells out to / reads git repositories.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the PyTorch index, so the CUDA (or CPU) build is the one
# installed. Its version "2.13.0+cu128" still satisfies a `torch==2.13.0` pin
# (PEP 440 ignores the local label), so the next step keeps it.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /opt/dreamline
COPY requirements.txt constraints.txt ./
RUN pip install -r requirements.txt -c constraints.txt

# Non-root user `dreamline`, uid 50000 / gid 0 like the Airflow image. The dirs
# are created here so named volumes mounted on them start owned by that user.
RUN useradd --uid 50000 --gid 0 --create-home --home-dir /home/dreamline dreamline \
    && mkdir -p /opt/airflow/logs /opt/hf-cache /opt/dreamline-state \
    && chown -R 50000:0 /opt/airflow /opt/hf-cache /opt/dreamline-state \
    && chmod -R g+rwX /opt/airflow /opt/hf-cache /opt/dreamline-state

# Code last, so edits don't invalidate the dependency layers.
COPY sd_tasks/ sd_tasks/
COPY plugins/ plugins/
COPY dags/ dags/

ENV PYTHONPATH=/opt/dreamline \
    AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/dreamline/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/dreamline/plugins \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    HF_HOME=/opt/hf-cache

USER 50000
# No ENTRYPOINT: compose gives each service its command (`airflow scheduler`,
# `mlflow server`, ...) and the pod spec gives `python -m sd_tasks <step>`.
