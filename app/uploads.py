"""Receiving a multipart upload by streaming it to disk, with a cap on its size.

The request body is never held in memory: each file part is written to its own file in the
job's input folder as it arrives (hashing it on the way), in batches of about 1 MiB handed to a
worker thread so the event loop is not blocked by disk writes. The size cap is checked against
``Content-Length`` before anything is read, and against the bytes actually received.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import anyio
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import InvalidRequest, MalformedUpload, UploadTooLarge

FILE_FIELDS = frozenset({"files", "bval", "bvec"})
TEXT_FIELDS = frozenset({"callback_url"})
MAX_TEXT_BYTES = 4096
MAX_PARTS = 10_000
_BATCH = 1 << 20


@dataclass
class Part:
    """One file part as received: its form field, where it was written, size and SHA-256."""

    field: str
    path: Path
    size: int = 0
    sha256: str = ""


@dataclass
class Form:
    """A received form: file parts in order, and the text fields."""

    parts: list[Part] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)


class _Receiver:
    """python-multipart callbacks writing file parts to ``dest/part-NNNNNN``."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.form = Form()
        self._headers: dict[bytes, bytes] = {}
        self._header_field = b""
        self._header_value = b""
        self._sink: IO[bytes] | None = None
        self._digest = hashlib.sha256()
        self._text: bytearray | None = None
        self._name = ""

    def on_part_begin(self) -> None:
        self._headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise MalformedUpload("a part of the form has no Content-Disposition: form-data with a name")
        self._name = options[b"name"].decode("utf-8", "replace")
        if self._name in TEXT_FIELDS:
            self._text = bytearray()
        elif self._name in FILE_FIELDS:
            if len(self.form.parts) >= MAX_PARTS:
                raise InvalidRequest(f"an upload may hold at most {MAX_PARTS} files; send a zip instead")
            path = self.dest / f"part-{len(self.form.parts):06d}"
            self.form.parts.append(Part(self._name, path))
            # closed in on_part_end, or in close() when the body breaks off
            self._sink, self._digest = open(path, "wb"), hashlib.sha256()  # noqa: SIM115
        else:
            expected = ", ".join(sorted(FILE_FIELDS | TEXT_FIELDS))
            raise InvalidRequest(f"unexpected form field {self._name[:40]!r}; the fields are {expected}")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._text is not None:
            self._text += chunk
            if len(self._text) > MAX_TEXT_BYTES:
                raise InvalidRequest(f"the form field {self._name!r} is longer than {MAX_TEXT_BYTES} bytes")
        elif self._sink is not None:
            self._sink.write(chunk)
            self._digest.update(chunk)
            self.form.parts[-1].size += len(chunk)

    def on_part_end(self) -> None:
        if self._text is not None:
            self.form.fields[self._name] = self._text.decode("utf-8", "replace").strip()
            self._text = None
        elif self._sink is not None:
            self._sink.close()
            self._sink = None
            self.form.parts[-1].sha256 = self._digest.hexdigest()

    @property
    def incomplete(self) -> bool:
        """True while a part is open (the body ended before its closing boundary)."""
        return self._sink is not None or self._text is not None

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()


def _boundary(content_type: str | None) -> bytes:
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise MalformedUpload("send the study as multipart/form-data (fields: files, bval, bvec, callback_url)")
    return options[b"boundary"]


async def receive_form(
    chunks: AsyncIterator[bytes], *, content_type: str | None, content_length: str | None, dest: Path, max_bytes: int
) -> Form:
    """Stream a multipart body into ``dest`` (which must exist) and return what it held.

    Raises :class:`UploadTooLarge` as soon as the body exceeds ``max_bytes`` (announced or
    received), :class:`MalformedUpload` for a body that is not multipart/form-data.
    """
    too_large = UploadTooLarge(f"the upload exceeds the limit of {max_bytes} bytes; send only the diffusion series")
    if content_length and content_length.isdigit() and int(content_length) > max_bytes:
        raise too_large
    receiver = _Receiver(dest)
    parser = MultipartParser(
        _boundary(content_type),
        {  # type: ignore[arg-type]
            "on_part_begin": receiver.on_part_begin,
            "on_part_data": receiver.on_part_data,
            "on_part_end": receiver.on_part_end,
            "on_header_field": receiver.on_header_field,
            "on_header_value": receiver.on_header_value,
            "on_header_end": receiver.on_header_end,
            "on_headers_finished": receiver.on_headers_finished,
        },
    )
    received, batch = 0, bytearray()
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > max_bytes:
                raise too_large
            batch += chunk
            if len(batch) >= _BATCH:
                await anyio.to_thread.run_sync(parser.write, bytes(batch))
                batch.clear()
        await anyio.to_thread.run_sync(parser.write, bytes(batch))
        parser.finalize()
        if receiver.incomplete or not (receiver.form.parts or receiver.form.fields):
            raise MalformedUpload("the multipart body is empty or ends in the middle of a part")
    except MultipartParseError as exc:
        raise MalformedUpload(f"the multipart body is malformed: {exc}") from exc
    finally:
        receiver.close()
    return receiver.form


async def drain(chunks: AsyncIterator[bytes], *, max_bytes: int) -> None:
    """Read and discard a body (for an idempotent replay), still bounded by ``max_bytes``."""
    received = 0
    async for chunk in chunks:
        received += len(chunk)
        if received > max_bytes:
            raise UploadTooLarge(f"the upload exceeds the limit of {max_bytes} bytes")
