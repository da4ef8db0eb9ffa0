"""Guards on the deployment files and the API document: hadolint on the Dockerfiles, the compose
file against the compose-spec JSON Schema and our own expectations, the images
installing from the hashed locks, and the committed OpenAPI file against the app."""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import httpx
import jsonschema
import service_helpers as h
import yaml
from external_tools import require
from fastapi.testclient import TestClient

from app.main import create_app
from app.openapi_export import DEFAULT_PATH, render
from app.settings import GatewaySettings
from service.store import Store

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
NGINX_CONF = ROOT / "docker" / "nginx.conf"


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


def test_the_images_install_from_the_hashed_locks_and_the_gateway_lock_is_slim() -> None:
    # that each lock matches pyproject.toml is tests/test_locks.py's business
    gateway = (ROOT / "docker" / "gateway.Dockerfile").read_text()
    worker = (ROOT / "docker" / "worker.Dockerfile").read_text()
    assert "pip install --require-hashes -r requirements/gateway.lock" in gateway
    assert "pip install --require-hashes -r requirements/service.lock -r requirements/postgres.lock" in worker
    assert "pip install --require-hashes -r requirements/onnxruntime-gpu.lock" in worker
    lock = (ROOT / "requirements" / "gateway.lock").read_text().splitlines()
    pinned = {re.split(r"[=\[ ]", line)[0] for line in lock if re.match(r"[A-Za-z0-9]", line)}
    heavy = {"onnxruntime", "dipy", "nibabel", "scipy", "numpy", "torch", "pydicom", "highdicom"}
    assert {"fastapi", "psycopg"} <= pinned and not pinned & heavy


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
    assert set(services) == {"redis", "postgres", "gateway", "worker", "deliveries", "nginx"}
    # webhooks and DICOMweb deliveries in their own worker, apart from the analyses (no GPU)
    assert services["worker"]["command"][:4] == ["scsnet", "worker", "--queues", "analyses"]
    assert services["deliveries"]["command"][:4] == ["scsnet", "worker", "--queues", "deliveries"]
    assert services["deliveries"]["image"] == services["worker"]["image"] and "deploy" not in services["deliveries"]
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    assert services["gateway"]["build"]["dockerfile"] == "docker/gateway.Dockerfile"
    assert services["worker"]["build"]["dockerfile"] == "docker/worker.Dockerfile"
    assert "--no-worker" in services["gateway"]["command"] and services["worker"]["command"][:2] == ["scsnet", "worker"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    for name in ("gateway", "worker", "deliveries"):
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


def _nginx_directives() -> dict[str, list[str]]:
    """Directive name -> its values (in order of appearance) in docker/nginx.conf."""
    found: dict[str, list[str]] = {}
    for line in NGINX_CONF.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.endswith(";"):
            name, _, value = line[:-1].partition(" ")
            found.setdefault(name, []).append(value.strip())
    return found


def test_nginx_is_in_front_with_tls_and_the_gateway_publishes_no_port() -> None:
    services = _compose()["services"]
    gateway, nginx = services["gateway"], services["nginx"]
    assert "ports" not in gateway and gateway["expose"] == ["8000"]
    assert [p.split(":")[-1] for p in nginx["ports"]] == ["443", "80"]
    assert "./docker/nginx.conf:/etc/nginx/conf.d/default.conf:ro" in nginx["volumes"]
    assert "./docker/tls:/etc/nginx/tls:ro" in nginx["volumes"]
    # the gateway believes X-Forwarded-For from nginx's fixed address alone
    proxy_ip = nginx["networks"]["edge"]["ipv4_address"]
    assert gateway["environment"]["SCSNET_FORWARDED_ALLOW_IPS"] == proxy_ip and "edge" in gateway["networks"]
    for name in ("redis", "postgres", "worker"):
        assert "ports" not in services[name]
    assert not list((ROOT / "docker").rglob("*key*.pem")), "a private key must never be committed"


def test_nginx_applies_the_gateways_bounds() -> None:
    d = _nginx_directives()
    defaults = GatewaySettings(data_dir=Path("/nonexistent"))
    assert d["proxy_pass"] == ["http://scsnet_gateway"] and d["server"] == ["gateway:8000"]
    assert d["client_header_timeout"] == [f"{defaults.header_timeout_s:g}s"] * 2  # both servers
    assert d["client_body_timeout"] == [f"{defaults.body_timeout_s:g}s"]
    assert d["keepalive_timeout"][-1] == f"{defaults.keep_alive_s}s" and d["send_timeout"]
    size = d["client_max_body_size"][0]
    assert size.endswith("g") and int(size[:-1]) * 1024**3 == defaults.max_upload_bytes
    assert f"scsnet_total {defaults.max_connections}" in d["limit_conn"]
    assert d["proxy_request_buffering"] == ["off"]
    assert d["proxy_set_header"][2:4] == ["X-Forwarded-For $remote_addr", "X-Forwarded-Proto $scheme"]
    assert d["return"][0] == "308 https://$host$request_uri"  # plain HTTP only redirects
    assert d["ssl_protocols"] == ["TLSv1.2 TLSv1.3"]


def _self_signed(folder: Path) -> None:
    folder.mkdir(parents=True)
    openssl = require("openssl", package="openssl", purpose="the nginx test makes a self-signed certificate")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(folder / "privkey.pem"), "-out", str(folder / "fullchain.pem")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


def render_nginx(folder: Path, *, upstream: str, https_port: int, http_port: int, header_timeout_s: int) -> Path:
    """docker/nginx.conf for a local run: the gateway at ``upstream``, 127.0.0.1 ports, the
    certificates and every temporary file in ``folder``, a shorter header timeout; wrapped in
    the main configuration the nginx image has (its http block includes conf.d)."""
    conf = NGINX_CONF.read_text()
    for old, new in (
        ("server gateway:8000;", f"server {upstream};"),
        ("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"),
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("/etc/nginx/tls/", f"{folder}/tls/"),
        ("client_header_timeout 10s;", f"client_header_timeout {header_timeout_s}s;"),
    ):
        assert old in conf, old
        conf = conf.replace(old, new)
    (folder / "scsnet.conf").write_text(conf)
    main = folder / "nginx.conf"
    temps = "".join(f"    {kind}_temp_path {folder}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    main.write_text(
        f"daemon off;\nmaster_process off;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log info;\n"
        f"events {{ worker_connections 64; }}\nhttp {{\n    access_log off;\n{temps}    include {folder}/scsnet.conf;\n}}\n"
    )
    return main


def test_a_real_nginx_with_the_repos_config_proxies_tls_to_the_gateway(tmp_path: Path, redis_server: h.RedisServer) -> None:
    nginx = require("nginx", package="nginx", purpose="a real nginx runs docker/nginx.conf in front of the gateway")
    folder = h.short_tmpdir("scsn")
    _self_signed(folder / "tls")
    settings = GatewaySettings(data_dir=tmp_path / "var", redis_url=redis_server.url, forwarded_allow_ips="127.0.0.1")
    store = Store(settings.store_url)
    key = store.create_api_key("a").key
    with h.gateway_in_thread(settings, store) as gateway:
        https_port, http_port = h.free_port(), h.free_port()
        main = render_nginx(folder, upstream=gateway.removeprefix("http://"), https_port=https_port, http_port=http_port, header_timeout_s=2)
        check = subprocess.run([nginx, "-t", "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(main)], check=False, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        process = subprocess.Popen(
            [nginx, "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(main)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            base = f"https://127.0.0.1:{https_port}"
            verify = ssl.create_default_context(cafile=str(folder / "tls" / "fullchain.pem"))

            def up() -> bool:
                assert process.poll() is None, (folder / "error.log").read_text()
                try:
                    return httpx.get(base + "/healthz", verify=verify, timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            h.wait_until(up, timeout_s=30, what="nginx")
            with httpx.Client(base_url=base, verify=verify, timeout=10) as client:
                health = client.get("/healthz")
                assert health.json() == {"status": "ok"} and health.headers["strict-transport-security"]
                listed = client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"})
                assert listed.status_code == 200 and listed.headers["cache-control"] == "no-store"
                refused = client.get("/v1/jobs", headers={"Authorization": "Bearer scsnet_nope_nope"})
                assert refused.status_code == 401 and refused.headers["content-type"] == "application/problem+json"
            plain = httpx.get(f"http://127.0.0.1:{http_port}/v1/jobs?limit=1", timeout=10)
            assert plain.status_code == 308 and plain.headers["location"].startswith("https://") and plain.headers["location"].endswith("/v1/jobs?limit=1")
            # the gateway saw the client's address from nginx's X-Forwarded-For (here 127.0.0.1 too),
            # and nginx closes a connection that sends nothing within its header timeout
            start = time.monotonic()
            with socket.create_connection(("127.0.0.1", https_port), timeout=10) as silent:
                silent.settimeout(10)
                assert silent.recv(1) == b""
            closed_after = time.monotonic() - start
            print(f"\nnginx closed a silent TLS connection after {closed_after:.2f} s (client_header_timeout 2s)")
            assert 1.5 <= closed_after <= 4, closed_after
        finally:
            process.terminate()
            process.wait(15)
