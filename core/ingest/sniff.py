"""What an uploaded file is, judged by its first bytes (never by its name), without nibabel or
pydicom: NIfTI-1/2 (also gzipped), DICOM (Part 10 with the ``DICM`` preamble, or a bare data
set starting with a group 0002/0008 element, also gzipped), zip, or plain text.

Only headers are read (a few hundred bytes, decompressed if gzipped), so this is cheap enough
for the gateway to reject the obviously wrong at once.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from enum import StrEnum
from pathlib import Path

GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_HEAD = 1024


class Kind(StrEnum):
    """Kinds of uploaded file the service tells apart."""

    nifti = "nifti"
    dicom = "dicom"
    zip = "zip"
    text = "text"
    unknown = "unknown"


def head(path: Path, n: int = _HEAD) -> tuple[bytes, bool]:
    """The first ``n`` bytes of the file, decompressed if it is gzipped; and whether it was."""
    with open(path, "rb") as handle:
        raw = handle.read(n)
    if not raw.startswith(GZIP_MAGIC):
        return raw, False
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read(n), True
    except (OSError, EOFError, zlib.error):
        return b"", True


def _nifti_dims(data: bytes) -> tuple[int, ...] | None:
    """The ``dim`` field of a NIfTI-1 or NIfTI-2 header, or None if ``data`` is not one."""
    for endian in "<>":
        if len(data) >= 348 and struct.unpack(endian + "i", data[:4])[0] == 348 and data[344:348] in (b"n+1\0", b"ni1\0"):
            dim = struct.unpack(endian + "8h", data[40:56])
            return tuple(int(d) for d in dim[1 : 1 + max(0, min(dim[0], 7))])
        if len(data) >= 540 and struct.unpack(endian + "i", data[:4])[0] == 540 and data[4:8] in (b"n+2\0", b"ni2\0"):
            dim = struct.unpack(endian + "8q", data[16:80])
            return tuple(int(d) for d in dim[1 : 1 + max(0, min(dim[0], 7))])
    return None


def _looks_like_bare_dicom(data: bytes) -> bool:
    """A DICOM data set without the 128-byte preamble: it starts with a (0002,xxxx) or
    (0008,xxxx) element in little-endian order, with an explicit VR or a small implicit length."""
    if len(data) < 8 or data[:2] not in (b"\x02\x00", b"\x08\x00") or data[3] != 0:
        return False
    vr = data[4:6]
    if vr.isalpha() and vr.isupper():
        return True
    return struct.unpack("<I", data[4:8])[0] < 1024


def _is_text(data: bytes) -> bool:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\r\n\t" for ch in text)


def sniff(path: Path) -> tuple[Kind, tuple[int, ...] | None]:
    """The kind of the file at ``path`` and, for NIfTI, its image dimensions."""
    data, _gz = head(path)
    dims = _nifti_dims(data)
    if dims is not None:
        return Kind.nifti, dims
    if data[128:132] == b"DICM" or _looks_like_bare_dicom(data):
        return Kind.dicom, None
    with open(path, "rb") as handle:
        if handle.read(4) in ZIP_MAGICS:
            return Kind.zip, None
    if data and _is_text(data):
        return Kind.text, None
    return Kind.unknown, None
