"""The identifying UIDs of a DICOM Part 10 file, read with the standard library only.

The gateway must answer a STOW-RS request per instance (its SOP Class and Instance UIDs, and
whether it belongs to the study of the URL) before any worker sees it, and it may not import
pydicom (the gateway stays free of the scientific stack). So this module walks the start of a
file by PS3.5 - the file meta information (group 0002, explicit VR little endian), then the data
set in its transfer syntax (implicit or explicit VR, little or big endian, deflated) - skipping
every value by seeking, nested sequences of undefined length included, and stops at the first
tag after Series Instance UID (0020,000E): data elements are sorted by tag, so nothing it needs
comes later. Pixel data is never read.

Anything that is not a well-formed Part 10 file raises :class:`NotDicom`; no other exception
escapes, whatever the bytes.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")  # deflated explicit VR LE; deflated image frames

# VRs whose explicit encoding has 2 reserved bytes and a 4-byte length (PS3.5 table 7.1-1)
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
_WANTED = {
    (0x0008, 0x0016): "sop_class_uid",
    (0x0008, 0x0018): "sop_instance_uid",
    (0x0020, 0x000D): "study_instance_uid",
    (0x0020, 0x000E): "series_instance_uid",
}
_LAST = (0x0020, 0x000E)
_MAX_DEPTH = 16
_MAX_ELEMENTS = 200_000
_MAX_UID = 64
_MAX_DEFLATED_HEADER = 64 * 1024 * 1024  # inflated bytes read from a deflated data set


class NotDicom(ValueError):
    """The bytes are not a well-formed DICOM Part 10 file (or lack a required UID)."""


@dataclass(frozen=True)
class DicomIds:
    """What identifies one stored instance (UIDs as in the file, without padding)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str


@dataclass
class _Syntax:
    implicit: bool
    little: bool


def peek(source: Path | BinaryIO) -> DicomIds:
    """The :class:`DicomIds` of a Part 10 file (a path or a seekable binary file object)."""
    if isinstance(source, Path):
        with source.open("rb") as f:
            return peek(f)
    try:
        return _peek(source)
    except NotDicom:
        raise
    except (struct.error, EOFError, OSError, ValueError, zlib.error, RecursionError, OverflowError) as exc:
        raise NotDicom(f"not a well-formed DICOM file ({type(exc).__name__})") from exc


def _peek(f: BinaryIO) -> DicomIds:
    f.seek(128)
    if f.read(4) != b"DICM":
        raise NotDicom("not a DICOM Part 10 file (no DICM prefix at byte 128)")
    found: dict[str, str] = {}
    meta = _Syntax(implicit=False, little=True)
    transfer = ""
    while True:
        start = f.tell()
        head = f.read(4)
        if len(head) < 4:
            raise NotDicom("the file ends inside its meta information")
        group, element = struct.unpack("<HH", head)
        if group != 0x0002:
            f.seek(start)
            break
        length = _length_vr(f, meta, "<")[0]
        if length == _UNDEFINED:
            raise NotDicom("undefined length in the file meta information")
        if (group, element) == (0x0002, 0x0010):
            transfer = _uid(f.read(length))
        else:
            _skip(f, length)
    if not transfer:
        raise NotDicom("the file meta information has no Transfer Syntax UID")
    syntax = _Syntax(implicit=transfer == IMPLICIT_LE, little=transfer != EXPLICIT_BE)
    if transfer in DEFLATED[:1]:
        inflated = zlib.decompressobj(-zlib.MAX_WBITS).decompress(f.read(), _MAX_DEFLATED_HEADER)
        f = io.BytesIO(inflated)
    _walk(f, syntax, found)
    missing = [name for name in _WANTED.values() if not found.get(name)]
    if missing:
        raise NotDicom(f"the data set has no {', '.join(missing)}")
    return DicomIds(transfer_syntax_uid=transfer, **found)


def _walk(f: BinaryIO, syntax: _Syntax, found: dict[str, str]) -> None:
    """Read the top-level data set until the first tag after the last wanted one (or its end),
    recording the wanted UIDs and skipping everything else."""
    order = "<" if syntax.little else ">"
    counter = [0]
    while True:
        counter[0] += 1
        if counter[0] > _MAX_ELEMENTS:
            raise NotDicom("too many data elements")
        head = f.read(4)
        if len(head) < 4:
            return  # the data set ended: whatever was found is all there is
        tag = struct.unpack(order + "HH", head)
        if tag > _LAST:
            return
        if tag[0] == 0xFFFE:
            raise NotDicom("a delimiter outside any sequence")
        length, vr = _length_vr(f, syntax, order)
        if tag in _WANTED:
            if length == _UNDEFINED or length > _MAX_UID:
                raise NotDicom(f"a UID element ({tag[0]:04X},{tag[1]:04X}) of impossible length")
            found[_WANTED[tag]] = _uid(_exact(f, length))
        elif length == _UNDEFINED:
            # a sequence (SQ, or UN holding one, whose content is implicit VR little endian)
            nested = _Syntax(implicit=True, little=True) if vr == b"UN" else syntax
            _sequence(f, nested, depth=1, counter=counter)
        else:
            _skip(f, length)


def _sequence(f: BinaryIO, syntax: _Syntax, *, depth: int, counter: list[int]) -> None:
    """Skip a sequence of undefined length: items up to the sequence delimiter."""
    if depth > _MAX_DEPTH:
        raise NotDicom("sequences nested too deep")
    order = "<" if syntax.little else ">"
    while True:
        tag = struct.unpack(order + "HH", _exact(f, 4))
        length = struct.unpack(order + "I", _exact(f, 4))[0]
        if tag == _SEQUENCE_END:
            return
        if tag != _ITEM:
            raise NotDicom("a sequence holds something other than items")
        if length == _UNDEFINED:
            _item(f, syntax, depth=depth, counter=counter)
        else:
            _skip(f, length)


def _item(f: BinaryIO, syntax: _Syntax, *, depth: int, counter: list[int]) -> None:
    """Skip an item of undefined length: elements up to the item delimiter."""
    order = "<" if syntax.little else ">"
    while True:
        counter[0] += 1
        if counter[0] > _MAX_ELEMENTS:
            raise NotDicom("too many data elements")
        tag = struct.unpack(order + "HH", _exact(f, 4))
        if tag == _ITEM_END:
            _exact(f, 4)
            return
        if tag[0] == 0xFFFE:
            raise NotDicom("a misplaced delimiter inside an item")
        length, vr = _length_vr(f, syntax, order)
        if length == _UNDEFINED:
            nested = _Syntax(implicit=True, little=True) if vr == b"UN" else syntax
            _sequence(f, nested, depth=depth + 1, counter=counter)
        else:
            _skip(f, length)


def _length_vr(f: BinaryIO, syntax: _Syntax, order: str) -> tuple[int, bytes]:
    """The value length of the element whose tag was just read (and its VR, if explicit)."""
    if syntax.implicit:
        return struct.unpack(order + "I", _exact(f, 4))[0], b""
    vr = _exact(f, 2)
    if vr in _LONG_VRS:
        _exact(f, 2)
        return struct.unpack(order + "I", _exact(f, 4))[0], vr
    if not (vr.isalpha() and vr.isupper()):
        raise NotDicom("an element has no valid VR where the transfer syntax wants one")
    return struct.unpack(order + "H", _exact(f, 2))[0], vr


def _exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise NotDicom("the file ends inside a data element")
    return data


def _skip(f: BinaryIO, length: int) -> None:
    """Seek past a value, refusing one that runs beyond the end of the file."""
    here = f.tell()
    end = f.seek(0, io.SEEK_END)
    if here + length > end:
        raise NotDicom("a data element runs past the end of the file")
    f.seek(here + length)


def _uid(raw: bytes) -> str:
    text = raw.rstrip(b"\x00 ").decode("ascii")
    if not all(c.isdigit() or c == "." for c in text):
        raise NotDicom("a UID holds characters other than digits and dots")
    return text
