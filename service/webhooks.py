"""Webhook payloads and their signature.

A delivery is ``POST callback_url`` with a small JSON body and the header::

    Scsnet-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

The secret is the tenant's (``scsnet apikey create`` prints it). Receivers recompute the HMAC
over the timestamp and the raw body, compare in constant time and reject old timestamps
(:func:`verify` does all three).
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


def payload(*, job_id: str, state: str, artifacts: dict[str, Any], problem: dict[str, Any] | None) -> bytes:
    """The JSON body announcing that a job reached a terminal state."""
    body: dict[str, Any] = {"job_id": job_id, "state": state, "links": job_links(job_id, artifacts)}
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
