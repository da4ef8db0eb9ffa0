"""Webhook payloads and their signature.

A delivery is ``POST callback_url`` with a small JSON body and the header::

    Scsnet-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

The key is the tenant's whole secret string as ``scsnet tenant create`` (or the ``apikey
create`` that created the tenant) printed it, ``whsec_`` prefix included, UTF-8 encoded; the
message is the decimal timestamp ``t``, one ``.``, and the raw body bytes as received (not
re-serialised JSON).

After ``scsnet tenant rotate-secret``, for its grace period, the header carries one ``v1`` per
valid secret, the new one first (the Stripe convention)::

    Scsnet-Signature: t=<unix seconds>,v1=<HMAC under the new secret>,v1=<HMAC under the old one>

so a receiver still holding the old secret and one already given the new one both accept it.
Receivers recompute the HMAC with their secret, accept the header if ANY ``v1`` matches
(compared in constant time), and reject old timestamps (:func:`verify` does all of it).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Sequence
from typing import Any

from service.links import job_links

SIGNATURE_HEADER = "Scsnet-Signature"
TOLERANCE_S = 300


def payload(
    *, job_id: str, state: str, artifacts: dict[str, Any], problem: dict[str, Any] | None, base_url: str | None = None
) -> bytes:
    """The JSON body announcing that a job reached a terminal state; with ``base_url`` (the
    gateway's public URL, ``SCSNET_PUBLIC_URL``) its links are absolute, else relative to it."""
    links = job_links(job_id, artifacts)
    if base_url:
        links = {key: base_url.rstrip("/") + path for key, path in links.items()}
    body: dict[str, Any] = {"job_id": job_id, "state": state, "links": links}
    if problem is not None:
        body["problem"] = problem
    return json.dumps(body, separators=(",", ":")).encode()


def _mac(secret: str, t: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secrets: str | Sequence[str], body: bytes, *, timestamp: int | None = None) -> str:
    """The ``Scsnet-Signature`` header value for ``body``: one ``v1`` per secret, in order
    (the current secret, then the previous one during a rotation's grace period)."""
    t = int(time.time()) if timestamp is None else timestamp
    keys = [secrets] if isinstance(secrets, str) else list(secrets)
    if not keys:
        raise ValueError("a webhook is signed with at least one secret")
    return ",".join([f"t={t}", *(f"v1={_mac(key, t, body)}" for key in keys)])


def verify(secret: str, header: str, body: bytes, *, tolerance_s: int = TOLERANCE_S, now: float | None = None) -> bool:
    """True if ``header`` is a recent signature of ``body`` and any of its ``v1`` values is the
    HMAC under ``secret``."""
    timestamps: list[str] = []
    macs: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            return False
        if name == "t":
            timestamps.append(value)
        elif name == "v1":
            macs.append(value)
    if len(timestamps) != 1 or not macs:
        return False
    try:
        t = int(timestamps[0])
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = _mac(secret, t, body)
    # every candidate compared, so the time taken does not tell which one matched
    return sum(hmac.compare_digest(expected, mac) for mac in macs) > 0
