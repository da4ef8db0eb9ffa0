"""Guards on the deployment files and the API document: hadolint on the Dockerfiles, the compose
file against the compose-spec JSON Schema and our own expectations, the gateway image's
requirements against pyproject's extras, and the committed OpenAPI file against the app."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

import jsonschema
import yaml
from fastapi.testclient import TestClient

from app.main import create_app
from app.openapi_export import DEFAULT_PATH, render
from app.settings import GatewaySettings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def _compose() -> dict:  # type: ignore[type-arg]
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def test_hadolint_passes_on_both_dockerfiles() -> None:
    assert [p.name for p in DOCKERFILES] == ["gateway.Dockerfile", "worker.Dockerfile"]
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run(
        [str(hadolint), "--no-color", "--config", str(ROOT / ".hadolint.yaml"), *map(str, DOCKERFILES)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_not_blind() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    bad = subprocess.run([str(hadolint), "-"], input="FROM python\nRUN cd /tmp && pip install x\n", capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode != 0 and "DL3006" in bad.stdout


def test_the_gateway_image_is_slim_and_the_worker_image_has_the_gpu_runtime() -> None:
    gateway = (ROOT / "docker" / "gateway.Dockerfile").read_text()
    worker = (ROOT / "docker" / "worker.Dockerfile").read_text()
    assert "--no-deps" in gateway and not re.search(r"onnxruntime|dipy|nibabel|torch|\.\[", gateway.split("FROM", 1)[1].replace("no onnxruntime, no dipy, no nibabel", ""))
    assert re.search(r"^FROM nvidia/cuda:12[\w.\-]*cudnn-runtime", worker, re.MULTILINE)
    assert "onnxruntime-gpu" in worker and "pip uninstall -y onnxruntime" in worker
    for text in (gateway, worker):
        assert re.search(r"^USER \d+$", text, re.MULTILINE)  # not root


def test_the_gateway_requirements_are_the_gateway_and_postgres_extras() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    lines = (ROOT / "docker" / "gateway-requirements.txt").read_text().splitlines()
    wanted = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert wanted == extras["gateway"] + extras["postgres"]
    heavy = {"onnxruntime", "dipy", "nibabel", "scipy", "numpy", "torch", "pydicom", "highdicom"}
    assert not {re.split(r"[<>=\[]", r)[0] for r in wanted} & heavy


def test_compose_file_matches_the_compose_spec_schema() -> None:
    schema_file = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    compose = _compose()
    jsonschema.validate(compose, schema)
    broken = {**compose, "services": {"gateway": {"image": "x", "ports": "8000:8000", "deploy": {"replicas": "many"}}}}
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(broken))
    assert errors  # the schema really checks


def test_compose_runs_redis_postgres_gateway_and_a_gpu_worker_on_a_shared_volume() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"redis", "postgres", "gateway", "worker"}
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    assert services["gateway"]["build"]["dockerfile"] == "docker/gateway.Dockerfile"
    assert services["worker"]["build"]["dockerfile"] == "docker/worker.Dockerfile"
    assert "--no-worker" in services["gateway"]["command"] and services["worker"]["command"][:2] == ["scsnet", "worker"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    for name in ("gateway", "worker"):
        env = services[name]["environment"]
        assert env["SCSNET_REDIS_URL"].startswith("redis://redis:")
        assert env["SCSNET_DATABASE_URL"].startswith("postgresql+psycopg://") and "@postgres:" in env["SCSNET_DATABASE_URL"]
        assert "scsnet-data:/data" in services[name]["volumes"] and env["SCSNET_DATA_DIR"] == "/data"
        assert set(services[name]["depends_on"]) == {"redis", "postgres"}
    assert "scsnet-data" in compose["volumes"]


def test_the_committed_openapi_document_is_what_the_app_serves(tmp_path: Path) -> None:
    settings = GatewaySettings(data_dir=tmp_path, redis_url="redis://127.0.0.1:6379/0")
    served = TestClient(create_app(settings)).get("/openapi.json").json()
    assert served["openapi"].startswith("3.1")
    assert DEFAULT_PATH.read_text() == render(served), "regenerate with: python -m app.openapi_export"
