"""File digests. Standard library only, so the gateway, the client, the science core and the
model tools can all share it."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_of(path: Path, *, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte blocks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
