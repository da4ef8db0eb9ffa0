"""The QC page (qc.html) of the real cervical DWI: self-contained, within its Content-Security-
Policy, and working in a real browser.

The browser tests drive Debian's headless ``chromium`` over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: NUL-separated JSON on file descriptors 3 and 4), so no websocket
package is needed; the page is served over real HTTP with the policy as a response header.
Run as a script (``python tests/test_qc_page.py docs/qc_page.png``) to refresh the README's
screenshot.
"""

from __future__ import annotations

import contextlib
import functools
import html
import http.server
import io
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from external_tools import require
from PIL import Image

from core import pipeline
from core.labels import REGIONS
from core.report import page_policy
from core.report.qc_page import write_qc_page
from core.segment.runtime import Segmenter
from core.settings import SHIPPED_MODEL_DIR

REAL_DWI = Path(__file__).parent / "data" / "sct_tutorial_dmri"
N_SLICES = 15


def analyse_real_dwi(out: Path) -> Path:
    """Run the real pipeline on the real DWI into ``out``; returns ``out / "qc.html"``."""
    pipeline.analyze(
        [REAL_DWI / "dmri.nii.gz"], bval=REAL_DWI / "bvals.txt", bvec=REAL_DWI / "bvecs.txt",
        out_dir=out, segmenter=Segmenter(SHIPPED_MODEL_DIR),
    )
    return out / "qc.html"


@pytest.fixture(scope="module")
def real_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return analyse_real_dwi(tmp_path_factory.mktemp("qc_page") / "out")


# --------------------------------------------------------------------------------------------
# The file


def test_page_is_self_contained_and_within_its_policy(real_page: Path) -> None:
    page = real_page.read_text(encoding="utf-8")
    print(f"\nqc.html of the real DWI: {len(page.encode()) / 1024:.1f} KiB")
    assert len(page.encode()) < 1_000_000
    for url in re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page):
        assert url.startswith(("data:image/png;base64,", "#")), url[:80]
    assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", page, re.IGNORECASE)
    assert "url(" not in page and "@import" not in page
    assert 'style="' not in page.lower()
    assert not re.search(r"\son[a-z]+\s*=", page, re.IGNORECASE)
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", page, re.DOTALL)
    styles = re.findall(r"<style\b[^>]*>(.*?)</style>", page, re.DOTALL)
    assert scripts == [page_policy.script()] and page.count("<script") == 1
    assert styles == [page_policy.style()] and page.count("<style") == 1
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', page)
    assert csp is not None and html.unescape(csp.group(1)) == page_policy.meta_policy()
    assert page.index(page_policy.REVIEW_MARKER) < page.index('id="warnings"')


def test_page_shows_every_slice_the_warnings_and_the_regions(real_page: Path) -> None:
    page = real_page.read_text(encoding="utf-8")
    report = json.loads((real_page.parent / "report.json").read_text())
    for z in range(N_SLICES):
        assert page.count(f'id="slice-{z}"') == 1
    assert page.count('class="outline"') == N_SLICES  # the switchable outline layer
    assert page.count('alt="FA"') == N_SLICES and page.count('alt="MD"') == N_SLICES
    assert 'id="warnings"' in page and "QC warnings: none" in page
    worst = report["most_compressed_slice"]
    assert f'class="slice worst" id="slice-{worst}"' in page
    for region in REGIONS:
        assert region.name in page
    assert f"{report['cord']['fa']['mean']:.3f}" in page


def test_warnings_are_prominent_values_escaped_and_missing_sections_tolerated(tmp_path: Path) -> None:
    import phantoms

    labels = phantoms.region_labels((40, 36, 4), radius_vox=8.0)
    labels[:, :, 3] = 0
    cube = np.where(labels > 0, 0.7, 0.1).astype(np.float32)
    analysis = SimpleNamespace(
        b0=np.where(labels > 0, 100.0, 300.0).astype(np.float32), segmentation=SimpleNamespace(labels=labels),
        maps=SimpleNamespace(fa=cube, md=cube * 1e-3), canonical=SimpleNamespace(zooms=(0.8, 0.8, 5.0)),
    )
    report: dict[str, Any] = {
        "input": {"files": [{"name": "a.nii.gz"}], "series_description": "<b>DTI</b>", "accession_number": "A&1"},
        "qc": {"warnings": ["no cord on slice 3", "<script>alert(1)</script>"], "slices_without_cord": [3]},
        "slices": [], "most_compressed_slice": None,
        "refinement": {"applied": True, "voxels_removed": 5, "first_pass_slices": [1, 2]},
    }
    out = tmp_path / "qc.html"
    write_qc_page(analysis, report, out)  # type: ignore[arg-type]
    page = out.read_text(encoding="utf-8")
    assert "QC warnings (2)" in page and "<li>no cord on slice 3</li>" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;DTI&lt;/b&gt;" in page and "A&amp;1" in page
    assert page.count("<script") == 1 and page.count('class="outline"') == 4
    assert "refinement: on, 5 outline voxels trimmed, first pass kept on slice(s) 1, 2" in page


# --------------------------------------------------------------------------------------------
# A real browser


class Browser:
    """Headless chromium driven over the DevTools protocol on a pipe (fd 3: commands in,
    fd 4: replies and events out, each message JSON ended by NUL)."""

    def __init__(self, executable: str, profile: Path) -> None:
        to_child, self._to_browser = os.pipe()
        self._from_browser, from_child = os.pipe()
        # Above 4, so that placing them at 3 and 4 in the child cannot close one of them.
        to_child, from_child = (_above(fd, 10) for fd in (to_child, from_child))
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        shell = f'exec "$0" "$@" 3<&{to_child} 4>&{from_child} {to_child}<&- {from_child}>&-'  # bash: dash knows fds 0-9 only
        self.process = subprocess.Popen(["bash", "-c", shell, executable, *args], pass_fds=(to_child, from_child),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._next_id = 0
        self._messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        with os.fdopen(self._from_browser, "rb", buffering=0) as stream:
            while chunk := stream.read(1 << 16):
                buffer += chunk
                *complete, buffer = buffer.split(b"\0")
                for raw in complete:
                    self._messages.put(json.loads(raw))

    def send(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        """Send one command and return its result; events seen meanwhile go to ``events``."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._messages.get(timeout=max(deadline - time.monotonic(), 0.01))
            if reply.get("id") == self._next_id:
                assert "error" not in reply, reply["error"]
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, *, since: int = 0, timeout: float = 30.0) -> dict[str, Any]:
        """The first event ``method`` from ``events[since]`` on, waiting for it if need be."""
        for event in self.events[since:]:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            event = self._messages.get(timeout=max(deadline - time.monotonic(), 0.01))
            self.events.append(event)
            if event.get("method") == method:
                return event

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing anyway
            self.send("Browser.close", timeout=5)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)


def _above(fd: int, lowest: int) -> int:
    """``fd`` moved to a descriptor number >= ``lowest`` (the original closed)."""
    import fcntl

    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest)
    os.close(fd)
    return moved


def chromium_or_skip() -> str:
    """Debian's chromium; a skip when absent, a failure under CI (CI=true)."""
    return require("chromium", package="chromium", purpose="the QC page was not opened in a browser")


class _PolicyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder with the QC page's Content-Security-Policy on every response."""

    def end_headers(self) -> None:
        self.send_header("Content-Security-Policy", page_policy.content_security_policy())
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(folder: Path) -> Iterator[str]:
    """Serve ``folder`` on 127.0.0.1 (a thread); yields the base URL."""
    handler = functools.partial(_PolicyHandler, directory=str(folder))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()


def open_page(browser: Browser, url: str, *, width: int, height: int) -> tuple[str, float]:
    """Open ``url`` in a new tab of ``width`` x ``height``; returns (session, load time in s).
    ``browser.events`` starts afresh."""
    browser.events.clear()
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.send(f"{domain}.enable", session=session)
    browser.send("Emulation.setDeviceMetricsOverride",
                 {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
    started, seen = time.monotonic(), len(browser.events)
    browser.send("Page.navigate", {"url": url}, session=session)
    browser.wait_for("Page.loadEventFired", since=seen)
    return session, time.monotonic() - started


def evaluate(browser: Browser, session: str, expression: str) -> Any:
    result = browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
    assert "exceptionDetails" not in result, result
    return result["result"].get("value")


def screenshot(browser: Browser, session: str) -> Image.Image:
    import base64

    data = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def press(browser: Browser, session: str, key: str) -> None:
    for kind in ("keyDown", "keyUp"):
        browser.send("Input.dispatchKeyEvent", {"type": kind, "key": key, "text": key if kind == "keyDown" else ""},
                     session=session)


def problems(events: list[dict[str, Any]]) -> list[str]:
    """Console errors, uncaught exceptions and log errors and warnings (CSP violations among
    them)."""
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            found.append(json.dumps(params["exceptionDetails"])[:300])
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
            found.append(json.dumps(params.get("args"))[:300])
        elif method == "Log.entryAdded" and params["entry"].get("level") in ("error", "warning"):
            found.append(f"{params['entry'].get('source')}: {params['entry'].get('text')}")
    return found


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    executable = chromium_or_skip()
    started = Browser(executable, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield started
    finally:
        started.close()


@pytest.fixture(scope="module")
def served(real_page: Path) -> Iterator[str]:
    yield from serve(real_page.parent)


def test_page_loads_in_chromium_under_its_policy_with_no_request_and_no_error(
    browser: Browser, served: str, real_page: Path, tmp_path: Path
) -> None:
    url = f"{served}/qc.html"
    session, load_s = open_page(browser, url, width=1400, height=1800)
    timing = evaluate(browser, session, "performance.timing.loadEventEnd - performance.timing.navigationStart")
    print(f"\nqc.html of the real DWI over HTTP: load event after {load_s * 1000:.0f} ms (wall), {timing} ms (navigation timing)")
    table = evaluate(browser, session, """(() => {
        const t = document.getElementById('region-table');
        if (!t) return null;
        const r = t.getBoundingClientRect();
        return {width: r.width, height: r.height, top: r.top, text: t.innerText};
    })()""")
    shot = screenshot(browser, session)
    shot.save(tmp_path / "qc_page.png")
    requests = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
    assert [u for u in requests if not u.startswith("data:")] == [url], requests
    assert problems(browser.events) == []
    assert table is not None and table["width"] > 300 and table["height"] > 100 and 0 <= table["top"] < 1800
    assert "left lateral funiculus" in table["text"] and "whole cord" in table["text"]
    assert len(np.unique(np.asarray(shot).reshape(-1, 3), axis=0)) > 500, "the screenshot is (nearly) blank"


def test_keys_move_between_slices_toggle_outlines_and_find_the_worst_slice(browser: Browser, served: str) -> None:
    session, _ = open_page(browser, f"{served}/qc.html", width=1400, height=1800)
    current = "document.querySelector('section.slice.current') && document.querySelector('section.slice.current').id"
    worst = evaluate(browser, session, "document.querySelector('section.slice.worst').id")
    press(browser, session, "w")
    assert evaluate(browser, session, current) == worst
    press(browser, session, "j")
    assert evaluate(browser, session, current) == f"slice-{int(worst.split('-')[1]) - 1}"  # down the page: inferior
    press(browser, session, "k")
    press(browser, session, "k")
    assert evaluate(browser, session, current) == f"slice-{int(worst.split('-')[1]) + 1}"
    visible = "getComputedStyle(document.querySelector('img.outline')).visibility"
    assert evaluate(browser, session, visible) == "visible"
    press(browser, session, "o")
    assert evaluate(browser, session, visible) == "hidden"
    assert problems(browser.events) == []


def save_readme_screenshot(path: Path) -> None:
    """Analyse the real DWI, open its page at 1280 x 1600 and save a small PNG at ``path``."""
    with tempfile.TemporaryDirectory() as tmp:
        page = analyse_real_dwi(Path(tmp) / "out")
        browser = Browser(shutil.which("chromium") or "chromium", Path(tmp) / "profile")
        try:
            base = serve(page.parent)
            session, _ = open_page(browser, f"{next(base)}/qc.html", width=1280, height=1600)
            image = screenshot(browser, session)
            base.close()
        finally:
            browser.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=True)  # RGB: a palette would shift the region colours
    print(f"{path}: {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    save_readme_screenshot(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/qc_page.png"))
