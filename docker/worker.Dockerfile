# scsnet worker: the analysis core on a GPU (ONNX Runtime CUDA provider, CPU fallback).
# Build from the repository root:  docker build -f docker/worker.Dockerfile -t scsnet-worker .
# CUDA 12 + cuDNN 9 runtime: what onnxruntime-gpu 1.18+ (CUDA 12 builds) links against.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SCSNET_DATA_DIR=/data

# Python 3.11 from Ubuntu (scsnet requires 3.11); a venv keeps pip away from the system Python.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/scsnet
# scsnet's dependencies and the PostgreSQL driver at the exact versions of the locks, each file
# checked against its sha256 (made by bash .ci/lock), then the CUDA build of ONNX Runtime in
# place of the CPU one, locked too (both install the onnxruntime module, so only one may be
# present; onnxruntime-gpu may lag the CPU release, hence its own lock). scsnet itself goes in
# below with --no-deps, so nothing brings the CPU build back.
COPY requirements/service.lock requirements/postgres.lock requirements/onnxruntime-gpu.lock ./requirements/
RUN pip install --require-hashes -r requirements/service.lock -r requirements/postgres.lock \
    && pip uninstall -y onnxruntime \
    && pip install --require-hashes -r requirements/onnxruntime-gpu.lock
COPY pyproject.toml README.md ./
COPY cli ./cli
COPY worker ./worker
COPY service ./service
COPY core ./core
COPY models ./models
RUN pip install --no-deps . \
    && useradd --system --uid 10001 --home-dir /data scsnet \
    && mkdir -p /data \
    && chown scsnet /data

USER 10001
VOLUME ["/data"]
# One analysis at a time per GPU; scale with more worker containers.
CMD ["scsnet", "worker", "--concurrency", "1"]
