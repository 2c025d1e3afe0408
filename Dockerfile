# syntax=docker/dockerfile:1
# Dreamline images, one build target each (build commands: docs/deployment.md, "Production run on one Docker host"):
#
#   airflow  Airflow's components (api-server, scheduler, dag-processor, triggerer) with dags/ and plugins/.
#            No torch, no sd_tasks: every step runs as a Kubernetes pod of the worker image.
#   mlflow   the MLflow tracking server of docker-compose.yaml (PostgreSQL stores, S3 artifacts, basic auth).
#   worker   `python -m sd_tasks <step>`: CUDA torch, the ML stack and sd_tasks/. The pods' image.
#
#   docker build --target worker --build-arg DREAMLINE_CODE_VERSION="$(git rev-parse HEAD)" -t REGISTRY/dreamline-worker:TAG .
#
# Every target needs DREAMLINE_CODE_VERSION, the commit the image is built from: registered model versions record
# it as code_version, and the build context has no .git to ask (see .dockerignore). Without it the build fails.
#
# Each image installs its own part of the requirements (requirements/{airflow,worker,mlflow}.txt) with the one
# constraints.txt that the tests run against, so every version in an image is one CI has seen. Dependencies are
# installed before the code is copied, so a code change rebuilds only the last layers.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# Airflow's official image: Airflow 3.3.2 on Python 3.11 in a virtualenv owned by the non-root user airflow
# (uid 50000, gid 0). pip aligns the packages Dreamline needs with constraints.txt; the image's other bundled
# providers are left as they are. Its slim variant (apache/airflow:slim-3.3.2-python3.11) bundles fewer of them,
# and everything this project needs is installed below either way.
ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.11

# ---------------------------------------------------------------------------------------------------------------
# The code-version check, its own stage so that a build without the argument fails in seconds, before any
# dependency is downloaded (BuildKit runs it beside the other stages; every target copies its output).
FROM ${PYTHON_IMAGE} AS code-version
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DREAMLINE_CODE_VERSION
RUN if ! printf '%s' "${DREAMLINE_CODE_VERSION}" | grep -Ex '[0-9a-f]{7,40}(-dirty)?' >/dev/null; then \
        echo "error: build argument DREAMLINE_CODE_VERSION must be the git commit of the build context," \
             "e.g. --build-arg DREAMLINE_CODE_VERSION=\"\$(git rev-parse HEAD)\"" \
             "(got: '${DREAMLINE_CODE_VERSION}'). Registered models record it as code_version." >&2; \
        exit 1; \
    fi; \
    printf '%s\n' "${DREAMLINE_CODE_VERSION}" > /code-version

# ---------------------------------------------------------------------------------------------------------------
FROM ${AIRFLOW_IMAGE} AS airflow
# The base image runs as airflow and refuses pip as root; its packages live in /home/airflow/.local, which that
# user owns. apache-airflow==3.3.2 is named in requirements/airflow.txt, so pip cannot move Airflow itself.
USER 50000:0
COPY constraints.txt /opt/dreamline/constraints.txt
COPY requirements/airflow.txt /opt/dreamline/requirements/airflow.txt
RUN pip install --no-cache-dir -r /opt/dreamline/requirements/airflow.txt -c /opt/dreamline/constraints.txt

# Steps cannot run in this image (no sd_tasks, no torch): they run as pods (plugins/dreamline/deployment.py).
ENV DREAMLINE_EXECUTOR=kubernetes \
    PYTHONDONTWRITEBYTECODE=1
# Airflow's default folders under AIRFLOW_HOME=/opt/airflow. The code stays owned by root: read-only to airflow.
COPY dags/ /opt/airflow/dags/
COPY plugins/ /opt/airflow/plugins/

COPY --from=code-version /code-version /opt/dreamline/CODE_VERSION
ARG DREAMLINE_CODE_VERSION
ARG DREAMLINE_SOURCE_URL=""
ENV DREAMLINE_CODE_VERSION=${DREAMLINE_CODE_VERSION}
LABEL org.opencontainers.image.title="dreamline-airflow" \
      org.opencontainers.image.description="Dreamline's Airflow components: the SDXL DreamBooth-LoRA DAG and its plugin" \
      org.opencontainers.image.revision="${DREAMLINE_CODE_VERSION}" \
      org.opencontainers.image.source="${DREAMLINE_SOURCE_URL}"
# Numeric, so that a pod's runAsNonRoot can check it.
USER 50000:0
# ENTRYPOINT and CMD: the base image's (`docker run IMAGE scheduler` runs `airflow scheduler`).

# ---------------------------------------------------------------------------------------------------------------
# What the mlflow and worker images share: Python 3.11 (the version constraints.txt was resolved for), a
# non-root user like Airflow's (uid 50000, gid 0) whose HOME is /tmp, and no bytecode written at run time.
FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HOME=/tmp
RUN useradd --uid 50000 --gid 0 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin dreamline
WORKDIR /opt/dreamline
COPY constraints.txt ./

# ---------------------------------------------------------------------------------------------------------------
FROM python-base AS mlflow
COPY requirements/mlflow.txt requirements/
RUN pip install --no-cache-dir -r requirements/mlflow.txt -c constraints.txt

COPY --from=code-version /code-version /opt/dreamline/CODE_VERSION
ARG DREAMLINE_CODE_VERSION
ARG DREAMLINE_SOURCE_URL=""
ENV DREAMLINE_CODE_VERSION=${DREAMLINE_CODE_VERSION}
LABEL org.opencontainers.image.title="dreamline-mlflow" \
      org.opencontainers.image.description="MLflow tracking server for Dreamline: PostgreSQL stores, S3 artifacts, basic auth" \
      org.opencontainers.image.revision="${DREAMLINE_CODE_VERSION}" \
      org.opencontainers.image.source="${DREAMLINE_SOURCE_URL}"
USER 50000:0
EXPOSE 5000
# No ENTRYPOINT: docker-compose.yaml gives the `mlflow server ...` command line.

# ---------------------------------------------------------------------------------------------------------------
FROM python-base AS worker
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# git: DVC clones the data registry. Not version-pinned: Debian replaces a package version when it publishes a
# security fix, so a pin breaks the build within weeks; the base image tag fixes the Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git \
    && rm -rf /var/lib/apt/lists/*

# torch first, on its own, from PyTorch's index: a CUDA build (the wheels bring the CUDA runtime, cuDNN and NCCL;
# GPU nodes need only the driver). A CPU image: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
# The version is constraints.txt's; "2.13.0+cu128" satisfies the `torch==2.13.0` pin (PEP 440 ignores the local
# label), so the next install keeps this build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN grep -Ex 'torch==[^ ]+' constraints.txt \
    | pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" --requirement /dev/stdin
COPY requirements/worker.txt requirements/no-deps.txt requirements/
RUN pip install --no-cache-dir -r requirements/worker.txt -c constraints.txt \
 && pip install --no-cache-dir --no-deps -r requirements/no-deps.txt -c constraints.txt

# Pods run with a read-only root filesystem, an emptyDir at /tmp (HOME=/tmp, TMPDIR=/tmp) and HF_HOME on a
# volume; nothing may need to write anywhere else. DVC keeps per-repository state in /var/tmp/dvc unless told
# otherwise; matplotlib, torch, triton and git write under HOME.
ENV DVC_SITE_CACHE_DIR=/tmp/dvc-site-cache \
    DVC_NO_ANALYTICS=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PYTHONPATH=/opt/dreamline
COPY sd_tasks/ sd_tasks/
# Bytecode now, as root, since it cannot be written at run time (read-only and PYTHONDONTWRITEBYTECODE).
RUN python -m compileall -q sd_tasks

COPY --from=code-version /code-version /opt/dreamline/CODE_VERSION
ARG DREAMLINE_CODE_VERSION
ARG DREAMLINE_SOURCE_URL=""
ENV DREAMLINE_CODE_VERSION=${DREAMLINE_CODE_VERSION}
LABEL org.opencontainers.image.title="dreamline-worker" \
      org.opencontainers.image.description="Dreamline steps (python -m sd_tasks STEP): SDXL DreamBooth-LoRA data preparation, training, evaluation, registration" \
      org.opencontainers.image.revision="${DREAMLINE_CODE_VERSION}" \
      org.opencontainers.image.source="${DREAMLINE_SOURCE_URL}"
USER 50000:0
# Pods give the command (`python -m sd_tasks`, or `accelerate launch ... -m sd_tasks` on several GPUs) and the
# step's argv as args; `docker run IMAGE validate --help` works the same.
ENTRYPOINT ["python", "-m", "sd_tasks"]
CMD ["--help"]
