"""Collecting uploaded input files into one flat working directory of plain files.

An upload may be any mix of files, folders (any nesting), ``.zip`` archives and gzipped files
(``.gz``, including gzipped DICOM). :func:`collect_inputs` turns it into a flat directory of
plain files, each named ``NNNNNN_<original name>`` so that names never collide, ready for
DICOM sniffing.

Safety rules (an upload is untrusted):

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
import stat
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO

from worker.errors import ArchiveError, UnreadableFileError
from worker.digest import sha256_of
from worker.ingest.dwi import FileDigest

GIB = 1024**3
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20
_SKIPPED_PREFIXES = ("__MACOSX/",)


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what one upload may expand to.

    Attributes
    ----------
    max_files : most plain files collected in total.
    max_total_bytes : most bytes written to the working directory in total.
    max_ratio : highest compression ratio (uncompressed / compressed) accepted for an entry
        larger than ``ratio_floor_bytes``; DICOM compresses 2-20x, zip bombs 1000x and more.
    ratio_floor_bytes : entries smaller than this skip the ratio check (tiny files can compress
        very well without being dangerous).
    """

    max_files: int = 20_000
    max_total_bytes: int = 4 * GIB
    max_ratio: float = 200.0
    ratio_floor_bytes: int = 1 << 20


DEFAULT_LIMITS = ArchiveLimits()


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
    """Writes plain files into ``workdir`` while enforcing :class:`ArchiveLimits`."""

    def __init__(self, workdir: Path, limits: ArchiveLimits) -> None:
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
    return path.suffix.lower() == ".zip" or _magic(path) in ZIP_MAGIC


def _is_gzip(path: Path) -> bool:
    return _magic(path, 2) == GZIP_MAGIC


def collect_inputs(
    paths: Sequence[Path], *, workdir: Path, limits: ArchiveLimits = DEFAULT_LIMITS
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
    if _magic(out) in ZIP_MAGIC or _magic(out, 2) == GZIP_MAGIC:
        raise ArchiveError(
            f"{origin} holds another compressed archive inside; nested archives are not "
            "accepted, upload the inner files instead"
        )


def _check_entry(info: zipfile.ZipInfo, *, archive: str, limits: ArchiveLimits) -> None:
    """Reject unsafe zip entries: traversal, symlinks, encryption, bombs."""
    name = info.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise ArchiveError(
            f"{archive} contains an entry with an unsafe path ({info.filename!r}) pointing outside "
            "the archive; it was refused"
        )
    mode = info.external_attr >> 16
    if info.create_system == 3 and stat.S_ISLNK(mode):
        raise ArchiveError(
            f"{archive} contains a symbolic link ({info.filename!r}); archives with links are refused"
        )
    if info.flag_bits & 0x1:
        raise ArchiveError(f"{archive} is password-protected; upload it without a password")
    if info.file_size > limits.ratio_floor_bytes:
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > limits.max_ratio:
            raise ArchiveError(
                f"{archive} entry {info.filename!r} expands {ratio:.0f} times (more than "
                f"{limits.max_ratio:g}), which is typical of a zip bomb; it was refused"
            )


def _open_zip(path: Path, label: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ArchiveError(f"{label} is not a readable zip archive (it is corrupt or truncated)") from exc


def _extract_zip(path: Path, *, label: str, collector: _Collector) -> None:
    limits = collector.limits
    with _open_zip(path, label) as archive:
        infos = [i for i in archive.infolist() if not i.is_dir()]
        if not infos:
            raise ArchiveError(f"{label} is an empty zip archive: it contains no files")
        if len(infos) > limits.max_files:
            raise ArchiveError(
                f"{label} holds {len(infos)} files, more than the {limits.max_files} accepted; "
                "upload only the diffusion series"
            )
        declared = sum(i.file_size for i in infos)
        if declared > limits.max_total_bytes:
            raise ArchiveError(
                f"{label} expands to {declared / GIB:.1f} GiB, more than the "
                f"{limits.max_total_bytes / GIB:g} GiB accepted; upload only the diffusion series"
            )
        for info in infos:
            _check_entry(info, archive=label, limits=limits)
        for info in infos:
            name = info.filename.replace("\\", "/")
            if name.startswith(_SKIPPED_PREFIXES) or PurePosixPath(name).name.startswith("._"):
                continue  # macOS resource forks, never images
            _extract_entry(archive, info, label=label, collector=collector)


def _extract_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, *, label: str, collector: _Collector) -> None:
    origin = f"{label}:{info.filename}"
    try:
        with archive.open(info) as entry:
            head = entry.read(4)
            if head in ZIP_MAGIC:
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
