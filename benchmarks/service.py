"""A real ``scsnet serve`` for the service benchmarks (3 and 4), in a throw-away data dir, on
127.0.0.1 only; separate ``scsnet worker`` processes on its embedded Redis; API keys made with
``scsnet apikey create``. Every wait is bounded and every process started here is stopped here.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.studies import REPO

SCSNET = [sys.executable, "-m", "cli.main"]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def wait_until(predicate: Callable[[], Any], *, timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}")


def _stop(process: subprocess.Popen[bytes], *, timeout_s: float = 30) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def model_for_workers(tmp: Path) -> tuple[Path, str]:
    """The shipped model (``models/scsnet``) if it is there and loads, else the decoder test
    model of ``tests/phantoms.py`` (written into ``tmp``). Returns (model dir, description)."""
    from core.errors import ScsnetError
    from core.segment.manifest import load_manifest
    from core.settings import SHIPPED_MODEL_DIR

    shipped = SHIPPED_MODEL_DIR
    try:
        manifest, _ = load_manifest(shipped)
        return shipped, f"shipped model {manifest.name} {manifest.version} ({shipped.relative_to(REPO)})"
    except (ScsnetError, OSError, ValueError):
        pass
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import phantoms
    finally:
        sys.path.remove(str(REPO / "tests"))
    model = phantoms.decoder_model(tmp / "decoder-model", spacing_mm=1.0, crop_px=32)
    return model, "decoder test model (tests/phantoms.py decoder_model(); the shipped model is not there yet)"


@dataclass
class Service:
    """A running ``scsnet serve`` (its process is the gateway) and any extra workers."""

    process: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    env: dict[str, str]
    log_path: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def create_key(self, tenant: str) -> str:
        """``scsnet apikey create --tenant``: the key is printed last."""
        out = subprocess.run([*SCSNET, "apikey", "create", "--tenant", tenant], env=self.env, capture_output=True, text=True, timeout=60, check=True)
        return out.stdout.strip().splitlines()[-1]

    def start_workers(self, n: int, *, timeout_s: float = 120) -> None:
        """Start ``n`` ``scsnet worker`` processes (one analysis at a time each) and wait until
        the gateway sees a heartbeat from each."""
        redis_url = f"redis+socket://{self.data_dir / 'redis' / 'redis.sock'}"
        env = {**self.env, "SCSNET_REDIS_URL": redis_url}
        for i in range(n):
            log = open(self.data_dir / "logs" / f"bench-worker-{len(self.workers)}.log", "ab")  # noqa: SIM115 - closed by the child's exit
            self.workers.append(
                subprocess.Popen([*SCSNET, "worker", "--concurrency", "1", "--loglevel", "WARNING"], env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            )
            log.close()
        key = self.create_key("bench-probe")

        def seen() -> bool:
            for w in self.workers:
                if w.poll() is not None:
                    raise RuntimeError(f"a worker exited early; see {self.data_dir / 'logs'}")
            try:
                return httpx.get(self.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5).json()["workers"] >= len(self.workers)
            except (httpx.HTTPError, ValueError, KeyError):
                return False

        wait_until(seen, timeout_s=timeout_s, what=f"{n} worker heartbeat(s)", interval_s=0.25)

    def stop_workers(self) -> None:
        for w in self.workers:
            _stop(w, timeout_s=30)
        self.workers.clear()

    def stop(self) -> None:
        self.stop_workers()
        _stop(self.process, timeout_s=60)

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=30).text


def start_service(tmp: Path, *, model_dir: Path, worker: bool = False, extra_env: dict[str, str] | None = None, timeout_s: float = 90) -> Service:
    """``scsnet serve --no-worker`` (or with its worker) on 127.0.0.1 and a free port, data in a
    short folder under ``tmp``; waits for ``/healthz`` (and ``/readyz`` with a worker)."""
    data = tmp / "var"
    (data / "logs").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCSNET_")}
    env.update(
        {"SCSNET_DATA_DIR": str(data), "SCSNET_MODEL_DIR": str(model_dir), "SCSNET_HEARTBEAT_S": "2", "PYTHONPATH": str(REPO)},
        **(extra_env or {}),
    )
    port = free_port()
    log_path = tmp / "serve.log"
    argv = [*SCSNET, "serve", "--host", HOST, "--port", str(port), "--shutdown-timeout", "20"]
    if not worker:
        argv.append("--no-worker")
    with open(log_path, "wb") as sink:
        process = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp)
    service = Service(process, f"http://{HOST}:{port}", data, env, log_path)
    probe = "/readyz" if worker else "/healthz"

    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"scsnet serve exited early:\n{log_path.read_text()[-3000:]}")
        try:
            return httpx.get(service.url + probe, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout_s=timeout_s, what="scsnet serve", interval_s=0.2)
    except BaseException:
        service.stop()
        raise
    return service


def short_tmp(prefix: str) -> Path:
    """A short temporary folder (the embedded Redis's Unix socket path must stay short)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)$")


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text exposition: (name, labels, value)."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m["labels"] or ""))
            samples.append((m["name"], labels, float(m["value"])))
    return samples
