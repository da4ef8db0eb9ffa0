"""A throwaway PostgreSQL cluster for tests: Debian's ``postgresql`` server binaries, a fresh
``initdb`` in a temporary folder, listening on 127.0.0.1 on a free port, stopped by its process
id. Run as the ``postgres`` user when the tests run as root (PostgreSQL refuses root).

Skips with the Debian package to install when the server is absent; fails instead under
``CI=true`` (``.ci/run`` installs it).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

PURPOSE = "the job store's tests against a real PostgreSQL"


def _binary(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def require_postgres() -> tuple[str, str]:
    """(initdb, postgres) executables; skip (fail under CI) naming the package when absent."""
    initdb, server = _binary("initdb"), _binary("postgres")
    reason = None
    if initdb is None or server is None:
        reason = f"PostgreSQL is not installed (Debian: apt-get install postgresql); {PURPOSE}"
    elif importlib.util.find_spec("psycopg") is None:
        reason = f"psycopg is not installed (bash .ci/venv test installs requirements/postgres.lock); {PURPOSE}"
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    assert initdb is not None and server is not None
    return initdb, server


@dataclass
class Cluster:
    """A running throwaway cluster; :meth:`database` makes a fresh, empty database."""

    port: int
    process: subprocess.Popen[bytes]
    folder: Path

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database`` (psycopg 3 driver, trust authentication)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """Create an empty database and return its URL (each test its own clean schema)."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres() -> dict[str, object]:
    """subprocess arguments that drop to the postgres user when running as root."""
    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam("postgres")
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


@contextmanager
def postgres_cluster(*, start_timeout_s: float = 30.0, settings: dict[str, str] | None = None) -> Iterator[Cluster]:
    """Start a cluster on 127.0.0.1 in a temporary folder; stop it and remove the folder.
    ``settings``: more server settings (``-c name=value``), e.g. ``{"timezone": "..."}``."""
    initdb, server = require_postgres()
    folder = Path(tempfile.mkdtemp(prefix="scsnet-pg-"))
    data = folder / "data"
    drop = _as_postgres()
    if drop:
        os.chown(folder, drop["user"], drop["group"])  # type: ignore[arg-type]
    subprocess.run(
        [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"],
        check=True, capture_output=True, **drop,  # type: ignore[arg-type]
    )  # fmt: skip
    port = _free_port()
    process = subprocess.Popen(
        [server, "-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", str(folder), "-c", "fsync=off",
         "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
         *(arg for name, value in (settings or {}).items() for arg in ("-c", f"{name}={value}"))],
        stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "wb"), **drop,  # type: ignore[arg-type]  # noqa: SIM115
    )  # fmt: skip
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited at start: {(folder / 'server.log').read_text()[-500:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not start listening in time")
            time.sleep(0.05)
        cluster = Cluster(port, process, folder)
        _wait_accepting(cluster, deadline)
        yield cluster
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # "fast" shutdown
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _wait_accepting(cluster: Cluster, deadline: float) -> None:
    """Listening is not yet accepting connections (recovery at start): wait for a query."""
    import psycopg

    while True:
        try:
            with psycopg.connect(f"host=127.0.0.1 port={cluster.port} user=postgres dbname=postgres", connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
