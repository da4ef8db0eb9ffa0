"""Opaque, signed list cursors.

A cursor stands for a position in one tenant's job list (the ``seq`` of the last job shown). It
is 24 bytes, base64url: a 16-byte tag, HMAC-SHA256 of the tenant id and the seq under the
gateway's signing key, then the seq XORed with a pad derived from the tag under the same key
(a synthetic-IV construction). So a cursor neither shows the seq (nor how many jobs the service
holds) nor can be made or altered without the key, and one tenant's cursor is refused for
another: each is 400 ``invalid-cursor``, like garbage.

The key is ``SCSNET_SIGNING_KEY`` or else ``signing.key`` in the data dir: 32 random bytes,
owner-only (0600), created once atomically (written whole under a temporary name, then linked
into place, which fails if another gateway got there first), so every gateway on that data dir
hands out cursors the others accept.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import threading
from pathlib import Path

from service.errors import InvalidCursor

KEY_FILE = "signing.key"
_TAG, _SEQ = 16, 8
_MAX_SEQ = 10**18  # well inside a 64-bit integer


def load_or_create_key(folder: Path) -> bytes:
    """The signing key in ``folder/signing.key``, created (0600, atomically) if absent."""
    path = folder / KEY_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{KEY_FILE}.{secrets.token_hex(8)}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as sink:
            sink.write(secrets.token_bytes(32))
            sink.flush()
            os.fsync(sink.fileno())
        try:
            os.link(temporary, path)  # never replaces: the first gateway's key wins
        except FileExistsError:
            pass
    finally:
        temporary.unlink(missing_ok=True)
    return path.read_bytes()


class Cursors:
    """Makes and reads the cursors of one signing key; the key is found at first use (a
    read-only data dir then fails a listing that needs a cursor, not the gateway's start)."""

    def __init__(self, *, key: bytes | None = None, folder: Path | None = None) -> None:
        if key is None and folder is None:
            raise ValueError("a signing key or the folder of its file is needed")
        self._key, self._folder = key, folder
        self._lock = threading.Lock()

    @property
    def key(self) -> bytes:
        if self._key is None:
            with self._lock:
                if self._key is None:
                    assert self._folder is not None
                    self._key = load_or_create_key(self._folder)
        return self._key

    def _tag(self, tenant_id: int, seq: int) -> bytes:
        message = b"scsnet-cursor\0" + tenant_id.to_bytes(8, "big", signed=True) + seq.to_bytes(_SEQ, "big")
        return hmac.new(self.key, message, hashlib.sha256).digest()[:_TAG]

    def _pad(self, tag: bytes) -> bytes:
        return hmac.new(self.key, b"scsnet-cursor-pad\0" + tag, hashlib.sha256).digest()[:_SEQ]

    def make(self, tenant_id: int, seq: int) -> str:
        """The cursor of ``seq`` in ``tenant_id``'s list."""
        tag = self._tag(tenant_id, seq)
        hidden = bytes(a ^ b for a, b in zip(seq.to_bytes(_SEQ, "big"), self._pad(tag)))
        return base64.urlsafe_b64encode(tag + hidden).decode("ascii").rstrip("=")

    def read(self, tenant_id: int, cursor: str) -> int:
        """The seq ``cursor`` stands for; :class:`InvalidCursor` (400) for anything this service
        did not hand out to this tenant (garbage, altered, another tenant's, another key's)."""
        try:
            raw = base64.urlsafe_b64decode(cursor.encode("ascii") + b"==")
        except (ValueError, binascii.Error):  # not base64, not ASCII
            raw = b""
        if len(raw) == _TAG + _SEQ and base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=") == cursor:
            tag, hidden = raw[:_TAG], raw[_TAG:]
            seq = int.from_bytes(bytes(a ^ b for a, b in zip(hidden, self._pad(tag))), "big")
            if 0 < seq < _MAX_SEQ and hmac.compare_digest(tag, self._tag(tenant_id, seq)):
                return seq
        raise InvalidCursor("the cursor is not one this service handed out; start again without it")
