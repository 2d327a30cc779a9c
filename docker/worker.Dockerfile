# syntax=docker/dockerfile:1
# The image of an mlsae Prefect worker, and of the flow runs a Docker or Kubernetes
# worker starts (docs/deploy.md). Built from the repository root:
#
#   docker build -f docker/worker.Dockerfile -t mlsae-worker:cpu .
#   docker build -f docker/worker.Dockerfile --build-arg TORCH_VARIANT=cuda -t mlsae-worker:cuda .
#
# Without arguments the container starts a Prefect worker for $MLSAE_POOL (needs
# PREFECT_API_URL); with arguments it runs them, which is how Docker and Kubernetes
# workers start a flow run in it (`prefect flow-run execute`).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# cpu: torch's CPU build from the PyTorch index (PyPI's Linux wheel would bring several
# GB of CUDA libraries). cuda: PyPI's Linux wheel, which carries the CUDA runtime as
# wheels; the host needs only the NVIDIA driver and container toolkit. TORCH_INDEX_URL
# picks another index, e.g. https://download.pytorch.org/whl/cu126 for another CUDA.
ARG TORCH_VARIANT=cpu
# As scripts/bootstrap.sh pins it for CPU machines; pyproject.toml allows >=2.4.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
# s3: the warehouse in a bucket; dask: the sweep's Dask task runner; workers: what a
# Docker or Kubernetes work pool's worker needs (prefect-docker, prefect-kubernetes).
ARG MLSAE_EXTRAS=s3,dask,workers

# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/hf \
    MLSAE_SCRATCH=/scratch \
    MLSAE_POOL=mlsae-process \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    TOKENIZERS_PARALLELISM=false
# (DL3064 mistakes TOKENIZERS_PARALLELISM for a secret.)

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN useradd --create-home --uid 1000 --shell /bin/bash mlsae \
 && mkdir -p /opt/mlsae /data/hf /scratch \
 && chown mlsae:mlsae /opt/mlsae /data/hf /scratch

# torch alone first: the largest layer, and the one that changes least often.
RUN case "${TORCH_VARIANT}" in \
      cpu)  index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      cuda) index="${TORCH_INDEX_URL:-https://pypi.org/simple}" ;; \
      *)    echo "TORCH_VARIANT must be cpu or cuda, not ${TORCH_VARIANT}" >&2; exit 1 ;; \
    esac \
 && pip install --no-cache-dir --index-url "${index}" "torch==${TORCH_VERSION}"

WORKDIR /opt/mlsae
COPY --chown=mlsae:mlsae . /opt/mlsae
# Editable, as in a checkout: deployments load flows/*.py from /opt/mlsae (their pull
# step sets that working directory), and the tasks they import are the same files.
RUN pip install --no-cache-dir -e ".[${MLSAE_EXTRAS}]" \
 && python -c "import torch, mlsae, flows.sweep; print('torch', torch.__version__)"

COPY --chmod=755 docker/worker-entrypoint.sh /usr/local/bin/mlsae-worker-entrypoint

# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 1000:1000
# Hugging Face downloads and activation caches: worth keeping across containers.
VOLUME ["/data/hf", "/scratch"]
ENTRYPOINT ["/usr/local/bin/mlsae-worker-entrypoint"]
