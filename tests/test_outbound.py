"""Outbound requests a tenant can aim (service/outbound.py): private networks refused, the
address checked is the address used, no redirects, a total deadline, bounded reads, and only
delivered/failed for the tenant. Real HTTP servers on 127.0.0.1 (allowed only with
``allow_private``); the resolver is the one seam faked, to play a DNS answer that changes."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from external_tools import require

from service import outbound
from service.outbound import UnsafeDestination, check_destination, is_public, post

PRIVATE = [
    "127.0.0.1",
    "127.8.9.10",
    "::1",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "fe80::1",
    "fc00::1",
    "100.64.0.1",
    "0.0.0.0",
    "::",
    "224.0.0.1",
    "ff02::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "240.0.0.1",
]


@pytest.mark.parametrize("address", PRIVATE)
def test_loopback_private_link_local_multicast_and_reserved_addresses_are_not_public(address: str) -> None:
    assert not is_public(address)


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_public(address: str) -> None:
    assert is_public(address)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://[::1]:8080/hook",
        "https://169.254.169.254/latest/meta-data",
        "http://10.0.0.5:5432/",
        "http://[::ffff:192.168.0.1]/",
        "http://0.0.0.0:8000/",
    ],
)
def test_literal_private_destinations_are_refused_without_repeating_them(url: str) -> None:
    with pytest.raises(UnsafeDestination) as refused:
        check_destination(url, allow_private=False)
    assert "SCSNET_ALLOW_PRIVATE_NETWORKS" in refused.value.detail
    assert url.split("/")[2].strip("[]") not in refused.value.detail
    assert check_destination(url, allow_private=True).address  # the operator may allow them


def test_a_name_that_resolves_to_loopback_is_refused() -> None:
    with pytest.raises(UnsafeDestination):
        check_destination("http://localhost:9/hook", allow_private=False)


def test_a_name_with_one_private_address_among_public_ones_is_refused() -> None:
    def resolve(host: str, port: int) -> list[str]:
        return ["93.184.215.14", "10.0.0.7"]

    with pytest.raises(UnsafeDestination):
        check_destination("https://receiver.example/hook", allow_private=False, resolve=resolve)


@pytest.mark.parametrize("url", ["ftp://example.org/x", "file:///etc/passwd", "gopher://example.org", "http://", "http://[::1"])
def test_other_schemes_and_broken_urls_are_refused(url: str) -> None:
    with pytest.raises(UnsafeDestination):
        check_destination(url, allow_private=True)


def test_an_unresolvable_name_is_refused() -> None:
    with pytest.raises(UnsafeDestination, match="does not resolve"):
        check_destination("http://no-such-host.invalid/hook", allow_private=True)


# --- real receivers on 127.0.0.1 -----------------------------------------------------------


class _Receiver(BaseHTTPRequestHandler):
    behaviour = "ok"
    seen: list[tuple[str, str, bytes]] = []

    def log_message(self, *args: object) -> None:
        return

    def do_POST(self) -> None:  # noqa: N802 - the http.server spelling
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).seen.append((self.path, self.headers.get("Host", ""), body))
        if self.behaviour == "redirect":
            self.send_response(307)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.behaviour == "trickle":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
        elif self.behaviour == "huge":
            self.send_response(200)
            self.send_header("Content-Length", str(50 * 1024 * 1024))
            self.end_headers()
            chunk = b"y" * 65536
            try:
                for _ in range(800):
                    self.wfile.write(chunk)
            except OSError:
                pass  # the client stopped reading: the point of the test
        elif self.behaviour == "error":
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(204)
            self.end_headers()


@contextmanager
def receiver(behaviour: str, *, tls: ssl.SSLContext | None = None) -> Iterator[int]:
    """A receiver on 127.0.0.1 (over TLS with ``tls``); afterwards ``receiver.seen`` holds
    (path, Host, body) of each request it got."""
    handler = type("Handler", (_Receiver,), {"behaviour": behaviour, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
    receiver.seen = handler.seen  # type: ignore[attr-defined]


def test_a_local_receiver_is_refused_without_allow_private_and_nothing_reaches_it() -> None:
    with receiver("ok") as port:
        outcome = post(f"http://127.0.0.1:{port}/hook", content=b"{}", headers={}, allow_private=False, deadline_s=5)
    assert not outcome.delivered and outcome.detail.startswith("refused")
    assert receiver.seen == []  # type: ignore[attr-defined]


def test_a_local_receiver_allowed_by_the_operator_gets_the_body_and_the_host_name() -> None:
    with receiver("ok") as port:
        outcome = post(
            f"http://localhost:{port}/hook?x=1", content=b'{"a":1}', headers={"X-T": "1"}, allow_private=True, deadline_s=5
        )
    assert outcome.delivered and outcome.status_code == 204
    assert receiver.seen == [("/hook?x=1", f"localhost:{port}", b'{"a":1}')]  # type: ignore[attr-defined]


def test_redirects_are_not_followed() -> None:
    with receiver("redirect") as port:
        outcome = post(f"http://127.0.0.1:{port}/hook", content=b"{}", headers={}, allow_private=True, deadline_s=5)
    assert not outcome.delivered and outcome.status_code == 307
    assert [path for path, _, _ in receiver.seen] == ["/hook"]  # type: ignore[attr-defined]


def test_a_receiver_trickling_its_answer_is_cut_off_at_the_total_deadline() -> None:
    with receiver("trickle") as port:
        started = time.monotonic()
        outcome = post(f"http://127.0.0.1:{port}/hook", content=b"{}", headers={}, allow_private=True, deadline_s=1.5)
        took = time.monotonic() - started
    assert not outcome.delivered and "1.5 s" in outcome.detail
    assert took < 3.0, f"the delivery took {took:.1f} s for a 1.5 s deadline (the receiver trickles for 20 s)"


def test_a_huge_answer_is_read_only_up_to_the_bound() -> None:
    with receiver("huge") as port:
        outcome = post(
            f"http://127.0.0.1:{port}/hook", content=b"{}", headers={}, allow_private=True, deadline_s=10, max_response_bytes=1000
        )
    assert outcome.delivered and len(outcome.body) == 1000


def test_an_error_answer_and_a_closed_port_are_failures_with_the_detail_for_the_operator_only() -> None:
    with receiver("error") as port:
        failed = post(f"http://127.0.0.1:{port}/hook", content=b"{}", headers={}, allow_private=True, deadline_s=5)
    assert not failed.delivered and failed.detail == "HTTP 503"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    refused = post(f"http://127.0.0.1:{closed_port}/hook", content=b"{}", headers={}, allow_private=True, deadline_s=5)
    assert not refused.delivered and refused.detail == "ConnectError"


def test_the_address_checked_is_the_address_connected_to_even_when_dns_changes() -> None:
    """DNS rebinding: the name is resolved once; the connection goes to that checked address,
    not to whatever a second lookup (made by the HTTP library) would answer."""
    answers = iter([["127.0.0.1"], ["10.9.9.9"]])  # the second answer would go elsewhere

    def resolve(host: str, port: int) -> list[str]:
        return next(answers)

    with receiver("ok") as port:
        outcome = post(
            f"http://hooks.example:{port}/h", content=b"{}", headers={}, allow_private=True, deadline_s=5, resolve=resolve
        )
    assert outcome.delivered
    assert receiver.seen[0][1] == f"hooks.example:{port}"  # type: ignore[attr-defined]


def test_a_name_checked_public_at_submission_that_turns_private_is_refused_at_delivery() -> None:
    answers = iter([["93.184.215.14"], ["127.0.0.1"]])

    def resolve(host: str, port: int) -> list[str]:
        return next(answers)

    check_destination("http://hooks.example/h", allow_private=False, resolve=resolve)  # at submission: public
    outcome = post("http://hooks.example/h", content=b"{}", headers={}, allow_private=False, deadline_s=5, resolve=resolve)
    assert not outcome.delivered and outcome.detail.startswith("refused")


def test_the_module_resolves_with_the_operating_system_by_default() -> None:
    assert "127.0.0.1" in outbound.system_resolver("localhost", 80) or "::1" in outbound.system_resolver("localhost", 80)


def _certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``name`` (and its key), made with the openssl command."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_https_goes_to_the_checked_address_with_the_certificate_checked_against_the_host_name(tmp_path: Path) -> None:
    require("openssl", package="openssl", purpose="it makes the test certificate")
    cert, key = _certificate(tmp_path, "hooks.example")
    trusted = ssl.create_default_context(cafile=str(cert))
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)

    def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    with receiver("ok", tls=server_side) as port:
        url = f"https://hooks.example:{port}/h"
        good = post(url, content=b"{}", headers={}, allow_private=True, deadline_s=5, resolve=resolve, verify=trusted)
        untrusted = post(url, content=b"{}", headers={}, allow_private=True, deadline_s=5, resolve=resolve)
        wrong_name = post(
            f"https://other.example:{port}/h", content=b"{}", headers={}, allow_private=True, deadline_s=5,
            resolve=resolve, verify=trusted,
        )  # fmt: skip
    assert good.delivered, good.detail
    assert not untrusted.delivered and untrusted.detail == "ConnectError"
    assert not wrong_name.delivered and wrong_name.detail == "ConnectError"
    assert [host for _, host, _ in receiver.seen] == [f"hooks.example:{port}"]  # type: ignore[attr-defined]
