"""Outbound HTTP requests a tenant can aim (webhooks, DICOMweb destinations), made safe for the
hospital's network.

A tenant chooses the URL, so a careless or hostile one could point the worker at the hospital's
own machines (loopback, 10.0.0.0/8, the cloud metadata address 169.254.169.254). Every request
made here therefore:

- resolves the host once and refuses it unless every address it resolves to is public
  (:func:`is_public`) - unless the operator allows private networks
  (``SCSNET_ALLOW_PRIVATE_NETWORKS=true``, for a one-machine install or tests);
- connects to the address it checked (the host name still goes in ``Host`` and in TLS's SNI and
  certificate check), so a DNS answer that changes between the check and the connection
  ("DNS rebinding") cannot redirect it;
- follows no redirect, stops reading the answer after ``max_response_bytes``, and gives up
  once ``deadline_s`` has passed in total (httpx's timeouts are per phase: a receiver sending
  one byte every two seconds would hold a worker for as long as it liked);
- reports to the tenant only whether it was delivered (:attr:`Outcome.delivered`); the status
  code or the connection error, which would let a tenant probe ports inside the network, are
  only for the operator's log (:attr:`Outcome.detail`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

from service.errors import InvalidRequest

Resolver = Callable[[str, int], list[str]]
"""``(host, port) -> addresses``: the addresses a host name stands for (a seam for tests)."""


class UnsafeDestination(InvalidRequest):
    """A URL the service will not send to: not http(s), unresolvable, or inside a private network."""

    type_slug = "unsafe-destination"
    title = "The destination is not allowed"
    status = 422


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (IPv4 and IPv6), as the operating system sees it."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_public(address: str) -> bool:
    """True for an address on the public Internet: not loopback, private, link-local,
    multicast, reserved, unspecified or shared (100.64/10); an IPv4 address mapped into IPv6
    (``::ffff:127.0.0.1``) is judged as the IPv4 address it carries."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class Target:
    """Where a URL may be sent: its parts and the checked address to connect to."""

    scheme: str
    host: str
    port: int
    address: str


def check_destination(url: str, *, allow_private: bool, resolve: Resolver = system_resolver) -> Target:
    """The checked :class:`Target` of ``url``; :class:`UnsafeDestination` if it may not be used.

    The message never repeats the URL or the addresses (the URL may carry secrets, and the
    addresses would tell a tenant about the network).
    """
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise UnsafeDestination("the destination URL cannot be parsed") from exc
    if parts.scheme not in ("http", "https") or not host:
        raise UnsafeDestination("the destination must be an absolute http or https URL")
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            addresses = resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise UnsafeDestination("the destination's host name does not resolve") from exc
    if not addresses:
        raise UnsafeDestination("the destination's host name does not resolve")
    if not allow_private and not all(is_public(a) for a in addresses):
        raise UnsafeDestination(
            "the destination is inside a private, loopback, link-local or multicast network; "
            "the operator may allow that with SCSNET_ALLOW_PRIVATE_NETWORKS=true"
        )
    return Target(parts.scheme, host, port, addresses[0])


@dataclass(frozen=True)
class Outcome:
    """What became of one request: ``delivered`` is all a tenant may see."""

    delivered: bool
    detail: str
    """For the operator's log only: the status code, or the kind of failure."""
    status_code: int | None = None
    body: bytes = b""
    """The start of the answer (at most ``max_response_bytes``)."""


def post(
    url: str,
    *,
    content: bytes,
    headers: Mapping[str, str],
    allow_private: bool,
    deadline_s: float,
    max_response_bytes: int = 64 * 1024,
    resolve: Resolver = system_resolver,
    verify: ssl.SSLContext | bool = True,
) -> Outcome:
    """POST ``content`` to ``url`` under the rules of this module; never raises for the
    receiver's faults (refused destination, network error, deadline), which become a failed
    :class:`Outcome`. ``verify``: how an https receiver's certificate is checked (default: the
    public CAs; an ``ssl.SSLContext`` loaded with a hospital's own CA), always against the URL's
    host name."""
    started = time.monotonic()
    try:
        target = check_destination(url, allow_private=allow_private, resolve=resolve)
    except UnsafeDestination as exc:
        return Outcome(False, f"refused: {exc.detail}")
    remaining = deadline_s - (time.monotonic() - started)
    if remaining <= 0:
        return Outcome(False, "deadline passed while resolving")
    try:
        return asyncio.run(
            asyncio.wait_for(_post(url, target, content, dict(headers), remaining, max_response_bytes, verify), remaining)
        )
    except TimeoutError:
        return Outcome(False, f"no complete answer within {deadline_s:g} s")
    except httpx.HTTPError as exc:
        return Outcome(False, type(exc).__name__)


async def _post(
    url: str,
    target: Target,
    content: bytes,
    headers: dict[str, str],
    timeout_s: float,
    max_bytes: int,
    verify: ssl.SSLContext | bool,
) -> Outcome:
    parts = urlsplit(url)
    address = f"[{target.address}]" if ":" in target.address else target.address
    pinned = urlunsplit((parts.scheme, f"{address}:{target.port}", parts.path or "/", parts.query, ""))
    default_port = target.port == (443 if target.scheme == "https" else 80)
    headers = {**headers, "Host": target.host if default_port else f"{target.host}:{target.port}"}
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    async with httpx.AsyncClient(follow_redirects=False, timeout=timeout_s, trust_env=False, verify=verify) as client:
        request = client.build_request("POST", pinned, content=content, headers=headers, extensions=extensions)
        response = await client.send(request, stream=True)
        try:
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk[: max_bytes - len(body)]
                if len(body) >= max_bytes:
                    break
        finally:
            await response.aclose()
    return Outcome(response.is_success, f"HTTP {response.status_code}", response.status_code, bytes(body))
