"""Slow and abusive clients against the real gateway served by uvicorn (``app.server``'s
configuration, as ``scsnet serve`` uses it) on 127.0.0.1, driven with raw sockets: a connection
that sends nothing, one that trickles its headers, a body that stalls, a normal request, and
more connections than ``max_connections``. Timeouts are short here (1.5 s); each test reports
the time the gateway took to close."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import service_helpers as h

from app.settings import GatewaySettings
from service.store import Store

HEADER_TIMEOUT_S = 1.5
BODY_TIMEOUT_S = 1.5
MARGIN_S = 1.0  # scheduling on a busy 2-core machine


@pytest.fixture()
def settings(tmp_path: Path, redis_server: h.RedisServer) -> GatewaySettings:
    return GatewaySettings(
        data_dir=tmp_path / "var",
        redis_url=redis_server.url,
        header_timeout_s=HEADER_TIMEOUT_S,
        body_timeout_s=BODY_TIMEOUT_S,
        keep_alive_s=5,
        max_upload_bytes=1 << 20,
    )


@pytest.fixture()
def gateway(settings: GatewaySettings) -> Iterator[tuple[str, Store]]:
    store = Store(settings.store_url)
    with h.gateway_in_thread(settings, store) as url:
        yield url, store


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def _closed_after(sock: socket.socket, *, limit_s: float, send_every_s: float | None = None, lines: Iterator[bytes] | None = None) -> tuple[float, bytes]:
    """Seconds until the peer closes ``sock`` (reading whatever it sends), optionally sending
    one of ``lines`` every ``send_every_s``; fails after ``limit_s``."""
    start = time.monotonic()
    received = b""
    next_send = start
    while time.monotonic() - start < limit_s:
        if lines is not None and send_every_s is not None and time.monotonic() >= next_send:
            try:
                sock.sendall(next(lines))
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - start, received
            next_send += send_every_s
        readable, _, _ = select.select([sock], [], [], 0.05)
        if readable:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return time.monotonic() - start, received
            if not chunk:
                return time.monotonic() - start, received
            received += chunk
    raise AssertionError(f"the connection was still open after {limit_s:g} s (received {received[:200]!r})")


def _header_lines() -> Iterator[bytes]:
    yield b"GET /healthz HTTP/1.1\r\n"
    yield b"Host: 127.0.0.1\r\n"
    n = 0
    while True:
        n += 1
        yield f"X-Slow-{n}: {n}\r\n".encode()


def test_a_connection_that_sends_nothing_is_closed_within_the_header_timeout(gateway, capsys) -> None:  # type: ignore[no-untyped-def]
    url, _ = gateway
    with _connect(url) as sock:
        took, received = _closed_after(sock, limit_s=HEADER_TIMEOUT_S + 10)
    with capsys.disabled():
        print(f"\nsilent connection closed after {took:.2f} s (header timeout {HEADER_TIMEOUT_S:g} s)")
    assert received == b""  # closed without an answer
    assert HEADER_TIMEOUT_S - 0.1 <= took <= HEADER_TIMEOUT_S + MARGIN_S


def test_headers_trickled_a_line_every_half_second_are_cut_off_at_the_total_deadline(gateway, capsys) -> None:  # type: ignore[no-untyped-def]
    url, _ = gateway
    with _connect(url) as sock:
        took, received = _closed_after(sock, limit_s=HEADER_TIMEOUT_S + 10, send_every_s=0.5, lines=_header_lines())
    with capsys.disabled():
        print(f"\ntrickling connection (a header line every 0.5 s) closed after {took:.2f} s (header timeout {HEADER_TIMEOUT_S:g} s)")
    assert received == b""
    assert HEADER_TIMEOUT_S - 0.1 <= took <= HEADER_TIMEOUT_S + MARGIN_S


def test_a_keep_alive_connection_gets_the_header_deadline_again_after_each_answer(gateway) -> None:  # type: ignore[no-untyped-def]
    url, _ = gateway
    with _connect(url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        time.sleep(0.3)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        lines = iter([b"GET /healthz HTTP/1.1\r\n", *(b"X-Slow: 1\r\n" for _ in range(100))])
        took, received = _closed_after(sock, limit_s=HEADER_TIMEOUT_S + 10, send_every_s=0.5, lines=lines)
    assert received == b"" and took <= HEADER_TIMEOUT_S + MARGIN_S


def test_a_stalled_upload_is_answered_408_and_removed(gateway, settings: GatewaySettings, capsys) -> None:  # type: ignore[no-untyped-def]
    url, store = gateway
    key = store.create_api_key("a").key
    boundary = "scsnetboundary"
    first_part = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"dwi.nii.gz\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + b"\x1f\x8b" + b"\0" * 2000
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 100000\r\n\r\n"
    ).encode()
    jobs = settings.data_root / "jobs"
    with _connect(url) as sock:
        sock.sendall(head + first_part)
        h.wait_until(lambda: jobs.is_dir() and any(jobs.iterdir()), timeout_s=10, what="the upload folder")
        took, received = _closed_after(sock, limit_s=BODY_TIMEOUT_S + 10)
    with capsys.disabled():
        print(f"\nstalled upload answered and closed after {took:.2f} s (body timeout {BODY_TIMEOUT_S:g} s)")
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout", received[:300]
    head_part, _, body = rest.partition(b"\r\n\r\n")
    assert b"connection: close" in head_part.lower() and b"application/problem+json" in head_part
    assert json.loads(body)["type"] == "https://scsnet.dev/problems/request-timeout"
    assert took <= BODY_TIMEOUT_S + MARGIN_S
    h.wait_until(lambda: not any(jobs.iterdir()), timeout_s=5, what="the partial upload to be removed")
    assert store.list_jobs(store.authenticate(key).id, state=None, before_seq=None, limit=10) == []  # type: ignore[union-attr]


def test_a_slow_but_steady_upload_is_not_cut_off(gateway) -> None:  # type: ignore[no-untyped-def]
    """The body bound is between two pieces, not on the whole body."""
    url, store = gateway
    key = store.create_api_key("a").key
    body = b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.bin\"\r\n\r\n" + b"x" * 64 + b"\r\n--b--\r\n"
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with _connect(url) as sock:
        sock.sendall(head)
        pieces = [body[i : i + 40] for i in range(0, len(body), 40)]
        for piece in pieces:  # about 1 s per piece: longer in all than the body timeout, never between two
            time.sleep(BODY_TIMEOUT_S * 0.6)
            sock.sendall(piece)
        sock.settimeout(10)
        answer = sock.recv(65536)
    assert len(pieces) * BODY_TIMEOUT_S * 0.6 > BODY_TIMEOUT_S
    assert answer.startswith(b"HTTP/1.1 415"), answer[:300]  # judged by its content: the body arrived whole


def test_normal_requests_still_work(gateway) -> None:  # type: ignore[no-untyped-def]
    url, store = gateway
    key = store.create_api_key("a").key
    with httpx.Client(base_url=url, timeout=10) as client:  # one keep-alive connection
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert "server" not in client.get("/healthz").headers


def test_connections_beyond_max_connections_are_answered_503(settings: GatewaySettings) -> None:
    limited = settings.model_copy(update={"max_connections": 3, "header_timeout_s": 20.0})
    with h.gateway_in_thread(limited, Store(limited.store_url)) as url:
        idle = [_connect(url) for _ in range(3)]
        try:
            time.sleep(0.2)
            refused = httpx.get(url + "/healthz", timeout=10)
            assert refused.status_code == 503, refused.text
        finally:
            for sock in idle:
                sock.close()
        h.wait_until(lambda: httpx.get(url + "/healthz", timeout=10).status_code == 200, timeout_s=10, what="a free slot")


def test_scsnet_serve_applies_the_header_timeout(tmp_path: Path, redis_server: h.RedisServer) -> None:
    """``scsnet serve`` itself is configured by app.server (not uvicorn's defaults)."""
    port = h.free_port()
    env = h.env_for(tmp_path / "var", SCSNET_REDIS_URL=redis_server.url, SCSNET_HEADER_TIMEOUT_S="1")
    log = tmp_path / "serve.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [*h.SCSNET, "serve", "--no-worker", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=tmp_path,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return httpx.get(url + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        h.wait_until(up, timeout_s=60, what="scsnet serve", interval_s=0.25)
        with _connect(url) as sock:
            took, _ = _closed_after(sock, limit_s=10)
        assert 0.9 <= took <= 1 + MARGIN_S
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.parametrize("trusted", [None, "127.0.0.1"])
def test_x_forwarded_for_is_believed_only_from_the_configured_proxy(settings: GatewaySettings, trusted: str | None) -> None:
    """Throttling keys on the client address: a client must not pick it by sending X-Forwarded-For."""
    configured = settings.model_copy(update={"forwarded_allow_ips": trusted, "auth_failures_max": 3})
    with h.gateway_in_thread(configured, Store(configured.store_url)) as url, httpx.Client(base_url=url, timeout=10) as client:
        wrong = {"Authorization": "Bearer scsnet_nope_nope"}
        for _ in range(3):
            assert client.get("/v1/jobs", headers={**wrong, "X-Forwarded-For": "192.0.2.1"}).status_code == 401
        other = client.get("/v1/jobs", headers={**wrong, "X-Forwarded-For": "192.0.2.2"})
    # ignored: all came from 127.0.0.1, now throttled; believed: 192.0.2.2 is another client
    assert other.status_code == (429 if trusted is None else 401)
