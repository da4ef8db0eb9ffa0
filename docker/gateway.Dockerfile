# scsnet gateway: the HTTP API only. Slim on purpose: no onnxruntime, no dipy, no nibabel;
# it stores uploads, records jobs and enqueues them by task name for the GPU workers.
# Build from the repository root:  docker build -f docker/gateway.Dockerfile -t scsnet-gateway .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SCSNET_DATA_DIR=/data

WORKDIR /opt/scsnet
# The `gateway` and `postgres` extras at the exact versions of requirements/gateway.lock, each file
# checked against its sha256 (the lock is made by bash .ci/lock; tests/test_locks.py keeps it in step).
COPY requirements/gateway.lock ./requirements/
RUN pip install --require-hashes -r requirements/gateway.lock

# Only what the gateway runs: the command line, the gateway, the shared service layer and the
# core (whose light modules the gateway imports: errors, upload rules, the output table); the
# core's scientific dependencies are not installed (import-linter keeps the gateway off them).
COPY pyproject.toml README.md ./
COPY cli ./cli
COPY app ./app
COPY service ./service
COPY core ./core
RUN pip install --no-deps . \
    && useradd --system --uid 10001 --home-dir /data scsnet \
    && mkdir -p /data \
    && chown scsnet /data

USER 10001
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["scsnet", "serve", "--no-worker", "--host", "0.0.0.0", "--port", "8000"]
