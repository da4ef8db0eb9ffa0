"""A throwaway Orthanc PACS for tests: Debian's ``orthanc`` with the ``orthanc-dicomweb``
plugin, configured by a JSON file in a temporary folder, HTTP (REST and DICOMweb) on 127.0.0.1 on
a free port, no DICOM port, stopped by its process id.

Skips naming the Debian packages when they are absent; fails instead under ``CI=true``
(``.ci/run`` installs them).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

PURPOSE = "the DICOMweb tests against a real PACS"


def require_orthanc() -> tuple[str, str]:
    """(Orthanc executable, DICOMweb plugin); skip (fail under CI) naming the packages."""
    executable = shutil.which("Orthanc")
    plugins = sorted(glob.glob("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*")) or sorted(
        glob.glob("/usr/lib/orthanc/libOrthancDicomWeb.so*")
    )
    if executable is None or not plugins:
        reason = f"Orthanc with its DICOMweb plugin is not installed (Debian: apt-get install orthanc orthanc-dicomweb); {PURPOSE}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return executable, plugins[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    """A running Orthanc; ``url`` is its REST root, ``dicomweb`` its DICOMweb root."""

    port: int
    folder: Path
    config: dict[str, Any]
    process: subprocess.Popen[bytes] | None = None
    executable: str = ""
    log: Path = field(default_factory=Path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, *, timeout_s: float = 30.0) -> None:
        """Start (or start again, with the same storage) and wait until it answers."""
        config_path = self.folder / "orthanc.json"
        config_path.write_text(json.dumps(self.config, indent=2))
        self.process = subprocess.Popen(
            [self.executable, f"--logfile={self.log}", str(config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start; see {self.log}")
            try:
                if httpx.get(f"{self.url}/system", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not answer in time; see {self.log}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop it by its process id (SIGTERM, then SIGKILL)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@contextmanager
def orthanc(*, servers: Mapping[str, Mapping[str, Any]] | None = None) -> Iterator[Orthanc]:
    """A started Orthanc in a temporary folder, with DICOMweb ``servers`` (Orthanc's
    ``DicomWeb.Servers`` entries: ``{"Url": ..., "HttpHeaders": {...}}``) it can send to."""
    executable, plugin = require_orthanc()
    folder = Path(tempfile.mkdtemp(prefix="scsnet-orthanc-"))
    port = _free_port()
    config: dict[str, Any] = {
        "Name": "scsnet-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "HttpTimeout": 60,
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Servers": dict(servers or {})},
    }
    pacs = Orthanc(port=port, folder=folder, config=config, executable=executable, log=folder / "orthanc.log")
    try:
        pacs.start()
        yield pacs
    finally:
        pacs.stop()
        shutil.rmtree(folder, ignore_errors=True)
