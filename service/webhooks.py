"""Webhook payloads and their signature.

A delivery is ``POST callback_url`` with a small JSON body and the header::

    Scsnet-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

The key is the tenant's whole secret string as ``scsnet apikey create`` prints it, ``whsec_``
prefix included, UTF-8 encoded; the message is the decimal timestamp ``t``, one ``.``, and
the raw body bytes as received (not re-serialised JSON). Receivers recompute the HMAC, compare
in constant time and reject old timestamps (:func:`verify` does all three).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
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


def sign(secret: str, body: bytes, *, timestamp: int | None = None) -> str:
    """The ``Scsnet-Signature`` header value for ``body``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, header: str, body: bytes, *, tolerance_s: int = TOLERANCE_S, now: float | None = None) -> bool:
    """True if ``header`` is a valid, recent signature of ``body`` under ``secret``."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        t = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields.get("v1", ""))
