"""Make the DICOM test archives in this folder from the shared dcm_qa data sets (run by hand).

Usage::

    .venv/bin/python tests/data/dicom/make_archives.py SOURCE   # the dcm_qa_* folders (the shared data set)

This is the only code in the project that reads the shared data folder, and only when run by
hand; the tests read the ``<name>.tar.xz`` archives it writes. For each data set it packs
``<name>/In/`` (the DICOM files) and ``<name>/Ref/`` (dcm2niix's
reference ``.bval``/``.bvec``/``.json``; reference NIfTI files only if under 100 KB) into
``<name>.tar.xz``, and copies the data set's licence to ``<name>.LICENSE``.

Gzipped DICOM files (Canon, Philips) are stored decompressed, under their name without ``.gz``:
a solid xz archive compresses the near-identical headers across hundreds of files far better
than per-file gzip does. The tests gzip the Philips files again to exercise gzipped input.

To keep the repository small, the pixel data of the larger data sets (see ``ZEROED``) are
overwritten with zeros of the same length: the headers, which carry everything the gradient
tables and geometry depend on, are untouched byte for byte, so dcm2niix still converts them to
the same b-values and b-vectors, and the archives compress to almost nothing.
"""

from __future__ import annotations

import gzip
import io
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import pydicom

HERE = Path(__file__).resolve().parent
REAL_PIXELS = ("dcm_qa_ge", "dcm_qa_uih")
ZEROED = ("dcm_qa_canon_61", "dcm_qa_decubitus", "dcm_qa_philips_dwi", "dcm_qa_sag", "dcm_qa_xa30")
MAX_REF_NIFTI_BYTES = 100_000
PIXEL_TAG = b"\xe0\x7f\x10\x00"


def zero_pixels(data: bytes) -> bytes:
    """The same DICOM file (bytes) with its native pixel data replaced by zeros, same length.

    Only explicit-VR little-endian files with uncompressed pixel data are touched; anything else
    is returned unchanged. The Pixel Data element is found as the last (7FE0,0010) tag whose
    declared length ends inside the file and equals the length pydicom reads.
    """
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception:  # noqa: BLE001 - not DICOM: keep as is (e.g. a text file in the export)
        return data
    if "PixelData" not in ds or ds.file_meta.get("TransferSyntaxUID") != pydicom.uid.ExplicitVRLittleEndian:
        return data
    n = len(ds.PixelData)
    at = data.rfind(PIXEL_TAG)
    while at >= 0:
        vr = data[at + 4 : at + 6]
        if vr in (b"OW", b"OB"):
            length = int.from_bytes(data[at + 8 : at + 12], "little")
            start = at + 12
            if length == n and start + length <= len(data):
                return data[:start] + bytes(length) + data[start + length :]
        at = data.rfind(PIXEL_TAG, 0, at)
    raise ValueError("pixel data element not found")


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o644
    info.mtime = 0  # reproducible archives
    tar.addfile(info, io.BytesIO(payload))


def _in_member(path: Path, rel: str, zero: bool) -> tuple[str, bytes]:
    """The archive member name and bytes for one input file: gunzipped, pixels zeroed if asked."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw, rel = gzip.decompress(raw), rel[: -len(".gz")]
    return rel, zero_pixels(raw) if zero else raw


def make_archive(source: Path, name: str) -> Path:
    """Write ``<name>.tar.xz`` and ``<name>.LICENSE`` beside this script; return the archive."""
    root = source / name
    zero = name in ZEROED
    out = HERE / f"{name}.tar.xz"
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "a.tar.xz"
        with tarfile.open(staging, "w:xz", preset=9) as tar:
            for path in sorted((root / "In").rglob("*")):
                if path.is_file():
                    rel = f"{name}/{path.relative_to(root).as_posix()}"
                    member, payload = _in_member(path, rel, zero)
                    _add(tar, member, payload)
            for path in sorted((root / "Ref").iterdir()):
                is_nifti = path.name.endswith((".nii", ".nii.gz"))
                if is_nifti and path.stat().st_size > MAX_REF_NIFTI_BYTES:
                    continue
                _add(tar, f"{name}/Ref/{path.name}", path.read_bytes())
        shutil.copyfile(staging, out)
    shutil.copyfile(root / "LICENSE", HERE / f"{name}.LICENSE")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit("usage: make_archives.py SOURCE (the folder holding the dcm_qa_* sets)")
    source = Path(argv[1])
    for name in REAL_PIXELS + ZEROED:
        out = make_archive(source, name)
        print(f"{out.name}: {out.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
