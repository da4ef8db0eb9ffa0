"""Receiving a multipart body by streaming it to disk, with a cap on its size.

Two kinds share one parser loop (:func:`_pump`): a ``multipart/form-data`` upload
(:func:`receive_form`, ``POST /v1/jobs``) and a ``multipart/related`` body of DICOM instances
(:func:`receive_related`, STOW-RS). The request body is never held in memory: each file part is
written to its own file as it arrives (hashing it on the way), in batches of about 1 MiB handed
to a worker thread so the event loop is not blocked by disk writes. The size cap is checked
against ``Content-Length`` before anything is read, and against the bytes actually received.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import anyio
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import InvalidRequest, MalformedUpload, UnsupportedMediaType, UploadTooLarge

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


class _PartHeaders:
    """python-multipart callbacks collecting each part's headers; a receiver adds what is done
    with the part (``on_headers_finished``, ``on_part_data``, ``on_part_end``)."""

    def __init__(self) -> None:
        self._headers: dict[bytes, bytes] = {}
        self._header_field = b""
        self._header_value = b""

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
        raise NotImplementedError

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        raise NotImplementedError

    def on_part_end(self) -> None:
        raise NotImplementedError

    def callbacks(self) -> dict[str, Callable[..., None]]:
        """The callbacks python-multipart's parser calls."""
        names = ("part_begin", "part_data", "part_end", "header_field", "header_value", "header_end", "headers_finished")
        return {f"on_{name}": getattr(self, f"on_{name}") for name in names}

    @property
    def incomplete(self) -> bool:
        """True while a part is open (the body ended before its closing boundary)."""
        raise NotImplementedError

    @property
    def empty(self) -> bool:
        """True if the body held nothing."""
        raise NotImplementedError

    def close(self) -> None:
        """Close the file of a part left open by a body that broke off."""


class _Receiver(_PartHeaders):
    """python-multipart callbacks writing the file parts of a form to ``dest/part-NNNNNN``."""

    def __init__(self, dest: Path) -> None:
        super().__init__()
        self.dest = dest
        self.form = Form()
        self._sink: IO[bytes] | None = None
        self._digest = hashlib.sha256()
        self._text: bytearray | None = None
        self._name = ""

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
        return self._sink is not None or self._text is not None

    @property
    def empty(self) -> bool:
        return not (self.form.parts or self.form.fields)

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()


@dataclass
class RelatedPart:
    """One part of a multipart/related body as received: its media type, and where it was
    written (None: not of the wanted type, so not kept), size and SHA-256."""

    media_type: str
    path: Path | None
    size: int = 0
    sha256: str = ""


class _RelatedReceiver(_PartHeaders):
    """python-multipart callbacks writing each ``media_type`` part of a multipart/related body
    to ``dest/part-NNNNNN``. A part of another type is recorded (the caller reports it as a
    failed instance) but its bytes are not kept; a part with no Content-Type is taken to be of
    the body's ``type`` (RFC 2387: the type of its parts)."""

    def __init__(self, dest: Path, *, media_type: str, max_parts: int) -> None:
        super().__init__()
        self.dest = dest
        self.media_type = media_type
        self.max_parts = max_parts
        self.parts: list[RelatedPart] = []
        self._sink: IO[bytes] | None = None
        self._digest = hashlib.sha256()
        self._open = False

    def on_headers_finished(self) -> None:
        if len(self.parts) >= self.max_parts:
            raise UploadTooLarge(f"a request may hold at most {self.max_parts} instances; send the study in several requests")
        kind, _ = parse_options_header(self._headers.get(b"content-type", self.media_type.encode()))
        media_type = kind.decode("latin-1")
        path = self.dest / f"part-{len(self.parts):06d}" if media_type == self.media_type else None
        self.parts.append(RelatedPart(media_type, path))
        self._open = True
        if path is not None:
            # closed in on_part_end, or in close() when the body breaks off
            self._sink, self._digest = open(path, "wb"), hashlib.sha256()  # noqa: SIM115

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        self.parts[-1].size += len(chunk)
        if self._sink is not None:  # a part of another type is counted, not kept
            self._sink.write(chunk)
            self._digest.update(chunk)

    def on_part_end(self) -> None:
        self._open = False
        if self._sink is not None:
            self._sink.close()
            self._sink = None
            self.parts[-1].sha256 = self._digest.hexdigest()

    @property
    def incomplete(self) -> bool:
        return self._open

    @property
    def empty(self) -> bool:
        return not self.parts

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()


def _boundary(content_type: str | None) -> bytes:
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise MalformedUpload("send the study as multipart/form-data (fields: files, bval, bvec, callback_url)")
    return options[b"boundary"]


def related_boundary(content_type: str | None, *, media_type: str) -> bytes:
    """The boundary of a ``multipart/related; type="<media_type>"`` Content-Type (the type quoted
    or not, in any case); :class:`UnsupportedMediaType` (415) for any other media type,
    :class:`MalformedUpload` (400) for one without a boundary."""
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/related" or options.get(b"type", b"").lower() != media_type.encode():
        raise UnsupportedMediaType(f'send the instances as multipart/related; type="{media_type}" (PS3.18 STOW-RS)')
    if not options.get(b"boundary"):
        raise MalformedUpload("the multipart/related Content-Type has no boundary")
    return options[b"boundary"]


def _check_announced(content_length: str | None, max_bytes: int, too_large: UploadTooLarge) -> None:
    """Refuse a body whose ``Content-Length`` is over the cap before reading any of it."""
    if content_length and content_length.isdigit() and int(content_length) > max_bytes:
        raise too_large


async def _pump(receiver: _PartHeaders, boundary: bytes, chunks: AsyncIterator[bytes], *, max_bytes: int, too_large: UploadTooLarge) -> None:
    """Feed a multipart body to ``receiver`` through python-multipart, in batches of about 1 MiB
    written by a worker thread; :class:`UploadTooLarge` past ``max_bytes`` received,
    :class:`MalformedUpload` for a broken, empty or cut-off body."""
    parser = MultipartParser(boundary, receiver.callbacks())  # type: ignore[arg-type]
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
        if receiver.incomplete or receiver.empty:
            raise MalformedUpload("the multipart body is empty or ends in the middle of a part")
    except MultipartParseError as exc:
        raise MalformedUpload(f"the multipart body is malformed: {exc}") from exc
    finally:
        receiver.close()


async def receive_form(
    chunks: AsyncIterator[bytes], *, content_type: str | None, content_length: str | None, dest: Path, max_bytes: int
) -> Form:
    """Stream a multipart body into ``dest`` (which must exist) and return what it held.

    Raises :class:`UploadTooLarge` as soon as the body exceeds ``max_bytes`` (announced or
    received), :class:`MalformedUpload` for a body that is not multipart/form-data.
    """
    too_large = UploadTooLarge(f"the upload exceeds the limit of {max_bytes} bytes; send only the diffusion series")
    _check_announced(content_length, max_bytes, too_large)
    receiver = _Receiver(dest)
    await _pump(receiver, _boundary(content_type), chunks, max_bytes=max_bytes, too_large=too_large)
    return receiver.form


async def receive_related(
    chunks: AsyncIterator[bytes],
    *,
    content_type: str | None,
    content_length: str | None,
    dest: Path,
    max_bytes: int,
    media_type: str = "application/dicom",
    max_parts: int = MAX_PARTS,
) -> list[RelatedPart]:
    """Stream a ``multipart/related`` body (STOW-RS) into ``dest`` (which must exist) and return
    its parts in order; those of ``media_type`` are written to ``dest``.

    Raises :class:`UnsupportedMediaType` for another Content-Type, :class:`UploadTooLarge`
    beyond ``max_bytes`` or ``max_parts``, :class:`MalformedUpload` for a broken or empty body.
    """
    boundary = related_boundary(content_type, media_type=media_type)
    too_large = UploadTooLarge(f"the request exceeds the limit of {max_bytes} bytes; send the study in several requests")
    _check_announced(content_length, max_bytes, too_large)
    receiver = _RelatedReceiver(dest, media_type=media_type, max_parts=max_parts)
    await _pump(receiver, boundary, chunks, max_bytes=max_bytes, too_large=too_large)
    return receiver.parts


async def drain(chunks: AsyncIterator[bytes], *, max_bytes: int) -> None:
    """Read and discard a body (for an idempotent replay), still bounded by ``max_bytes``."""
    received = 0
    async for chunk in chunks:
        received += len(chunk)
        if received > max_bytes:
            raise UploadTooLarge(f"the upload exceeds the limit of {max_bytes} bytes")
