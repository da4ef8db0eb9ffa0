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
COPY pyproject.toml README.md ./
COPY cli ./cli
COPY worker ./worker
COPY service ./service
COPY core ./core
COPY models ./models
# scsnet with the PostgreSQL driver, then the CUDA build of ONNX Runtime in place of the CPU
# one (both install the onnxruntime module, so only one may be present; installing through
# scsnet's requirements would bring the CPU build back, hence the plain install).
RUN pip install ".[postgres]" \
    && pip uninstall -y onnxruntime \
    && pip install "onnxruntime-gpu>=1.18,<2" \
    && useradd --system --uid 10001 --home-dir /data scsnet \
    && mkdir -p /data \
    && chown scsnet /data

USER 10001
VOLUME ["/data"]
# One analysis at a time per GPU; scale with more worker containers.
CMD ["scsnet", "worker", "--concurrency", "1"]
