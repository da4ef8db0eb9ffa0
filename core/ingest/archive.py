"""Collecting uploaded input files into one flat working directory of plain files.

An upload may be any mix of files, folders (any nesting), ``.zip`` archives and gzipped files
(``.gz``, including gzipped DICOM). :func:`collect_inputs` turns it into a flat directory of
plain files, each named ``NNNNNN_<original name>`` so that names never collide, ready for
DICOM sniffing.

Safety rules (an upload is untrusted; the per-archive checks and the limits are
:mod:`core.ingest.rules`', the same the gateway applies before a job is queued):

- zip entries with absolute paths, drive letters or ``..`` components are rejected (path
  traversal), as are symbolic-link entries and password-protected entries; entry paths are never
  used to build output paths anyway (the output is flat);
- limits on the number of files (default 20 000), on the total uncompressed size (default
  4 GiB, counted on the bytes actually written, not on what the archive declares) and on the
  compression ratio of any large entry (zip bombs);
- **nested archives are rejected**: a ``.zip`` inside a ``.zip`` raises :class:`ArchiveError`
  asking the user to upload the inner archive itself. PACS and scanner exports never nest zips,
  and refusing keeps the limits simple and the bomb surface small. A gzipped file inside a zip
  is decompressed (one level; a gzipped zip is rejected as nested);
- symbolic links found while walking folders are skipped, never followed.
"""

from __future__ import annotations

import gzip
import re
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO

from core.digest import sha256_of
from core.errors import ArchiveError, UnreadableFileError
from core.ingest.dwi import FileDigest
from core.ingest.rules import (
    DEFAULT_LIMITS,
    GIB,
    UploadLimits,
    check_zip_directory,
    is_skipped_entry,
    open_zip,
    zip_file_entries,
)
from core.ingest.sniff import GZIP_MAGIC, ZIP_MAGICS

_CHUNK = 1 << 20


@dataclass(frozen=True)
class CollectedInputs:
    """The flat working directory made from an upload.

    Attributes
    ----------
    files : plain files in the working directory, in collection order.
    origins : for each collected file, where it came from (``upload.zip:dir/IM_0001.gz``).
    digests : SHA-256 of every file as uploaded (a zip counts once, not per entry).
    """

    files: tuple[Path, ...]
    origins: dict[Path, str] = field(default_factory=dict)
    digests: tuple[FileDigest, ...] = ()


class _Collector:
    """Writes plain files into ``workdir`` while enforcing :class:`UploadLimits`."""

    def __init__(self, workdir: Path, limits: UploadLimits) -> None:
        self.workdir = workdir
        self.limits = limits
        self.files: list[Path] = []
        self.origins: dict[Path, str] = {}
        self.total_bytes = 0

    def _next_path(self, name: str) -> Path:
        if len(self.files) >= self.limits.max_files:
            raise ArchiveError(
                f"the upload holds more than {self.limits.max_files} files, more than a "
                "diffusion study needs; upload only the diffusion series"
            )
        return self.workdir / f"{len(self.files):06d}_{_safe_name(name)}"

    def add_stream(self, source: IO[bytes] | BinaryIO | gzip.GzipFile, *, name: str, origin: str, max_bytes: int | None = None) -> Path:
        """Copy ``source`` into a new file, counting bytes against the limits."""
        out = self._next_path(name)
        written = 0
        with open(out, "wb") as sink:
            while block := source.read(_CHUNK):
                written += len(block)
                self.total_bytes += len(block)
                if self.total_bytes > self.limits.max_total_bytes:
                    raise ArchiveError(
                        f"the upload expands to more than {self.limits.max_total_bytes / GIB:g} GiB "
                        "once unpacked; upload only the diffusion series"
                    )
                if max_bytes is not None and written > max_bytes:
                    raise ArchiveError(
                        f"{origin} expands to more than {max_bytes} bytes, far more than its "
                        "compressed size allows for real images: it is corrupt or a compression bomb"
                    )
                sink.write(block)
        self.files.append(out)
        self.origins[out] = origin
        return out


def _safe_name(name: str) -> str:
    """A base name safe for any file system: letters, digits, ``._-`` only, at most 80 chars."""
    base = PurePosixPath(name.replace("\\", "/")).name or "file"
    if base.lower().endswith(".gz"):
        base = base[:-3] or "file"
    return re.sub(r"[^A-Za-z0-9._-]", "_", base)[-80:]


def _magic(path: Path, n: int = 4) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(n)
    except OSError as exc:
        raise UnreadableFileError(f"{path.name} cannot be opened ({exc.strerror or exc})") from exc


def _is_zip(path: Path) -> bool:
    return path.suffix.lower() == ".zip" or _magic(path) in ZIP_MAGICS


def _is_gzip(path: Path) -> bool:
    return _magic(path, 2) == GZIP_MAGIC


def collect_inputs(
    paths: Sequence[Path], *, workdir: Path, limits: UploadLimits = DEFAULT_LIMITS
) -> CollectedInputs:
    """Gather files, folders, zips and gzipped files into a flat directory of plain files.

    Parameters
    ----------
    paths : uploaded files and folders; folders are walked recursively (symlinks skipped).
    workdir : directory to fill (created if missing); should be empty and job-private.
    limits : bounds on file count, unpacked size and compression ratio.

    Raises
    ------
    ArchiveError : unsafe, corrupt, empty, nested or oversized archive.
    UnreadableFileError : a missing path, or a truncated or corrupt gzip file.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    collector = _Collector(workdir, limits)
    digests: list[FileDigest] = []
    for path in paths:
        for file, label in _walk(Path(path)):
            digests.append(FileDigest(label, sha256_of(file)))
            _collect_file(file, label=label, collector=collector)
    if not collector.files:
        raise UnreadableFileError("the upload contains no files")
    return CollectedInputs(files=tuple(collector.files), origins=dict(collector.origins), digests=tuple(digests))


def _walk(path: Path) -> Iterator[tuple[Path, str]]:
    """Regular files under ``path`` (itself if a file) with a display label, symlinks skipped."""
    if path.is_symlink():
        return
    if path.is_file():
        yield path, path.name
        return
    if not path.is_dir():
        raise UnreadableFileError(f"{path.name} does not exist or is not a regular file or folder")
    for child in sorted(path.rglob("*")):
        if child.is_symlink() or not child.is_file():
            continue
        if any(part.is_symlink() for part in child.relative_to(path).parents if part != Path(".")):
            continue
        yield child, f"{path.name}/{child.relative_to(path).as_posix()}"


def _collect_file(path: Path, *, label: str, collector: _Collector) -> None:
    if _is_zip(path):
        _extract_zip(path, label=label, collector=collector)
    elif _is_gzip(path):
        with open(path, "rb") as raw:
            _add_gunzipped(
                raw, name=path.name, origin=label, collector=collector, compressed_size=path.stat().st_size
            )
    else:
        with open(path, "rb") as raw:
            collector.add_stream(raw, name=path.name, origin=label)


def _add_gunzipped(
    raw: IO[bytes], *, name: str, origin: str, collector: _Collector, compressed_size: int
) -> None:
    """Decompress one gzip stream (``compressed_size`` bytes) into the working directory, refusing
    to expand it more than ``max_ratio`` times (gzip bombs)."""
    limits = collector.limits
    max_bytes = max(limits.ratio_floor_bytes, int(compressed_size * limits.max_ratio))
    try:
        with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
            out = collector.add_stream(unzipped, name=name, origin=origin, max_bytes=max_bytes)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the disk failed (full, read-only), not the file: not the client's mistake
        raise UnreadableFileError(
            f"{origin} is a truncated or corrupt gzip file and cannot be decompressed"
        ) from exc
    if _magic(out) in ZIP_MAGICS or _magic(out, 2) == GZIP_MAGIC:
        raise ArchiveError(
            f"{origin} holds another compressed archive inside; nested archives are not "
            "accepted, upload the inner files instead"
        )


def _extract_zip(path: Path, *, label: str, collector: _Collector) -> None:
    with open_zip(path, label=label) as archive:
        check_zip_directory(archive.infolist(), label=label, limits=collector.limits)
        for info in zip_file_entries(archive.infolist()):
            if is_skipped_entry(info.filename):
                continue
            _extract_entry(archive, info, label=label, collector=collector)


def _extract_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, *, label: str, collector: _Collector) -> None:
    origin = f"{label}:{info.filename}"
    try:
        with archive.open(info) as entry:
            head = entry.read(4)
            if head in ZIP_MAGICS:
                raise ArchiveError(
                    f"{label} contains another zip archive ({info.filename}); nested archives are "
                    "not accepted, upload the inner archive itself"
                )
        with archive.open(info) as entry:
            if head[:2] == GZIP_MAGIC:
                _add_gunzipped(
                    entry, name=info.filename, origin=origin, collector=collector, compressed_size=info.file_size
                )
            else:
                collector.add_stream(entry, name=info.filename, origin=origin, max_bytes=info.file_size)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise ArchiveError(f"{label} is corrupt: entry {info.filename!r} cannot be decompressed") from exc
    except NotImplementedError as exc:
        raise ArchiveError(
            f"{label} uses a compression method that is not supported for entry {info.filename!r}; "
            "re-create it as a standard (deflate) zip"
        ) from exc
