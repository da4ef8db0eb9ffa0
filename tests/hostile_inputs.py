"""Generators of malformed and hostile uploads for ``tests/test_hostile_uploads.py``.

Every case is built from a small valid study (a region phantom as NIfTI and as a classic DICOM
series) by one deliberate corruption, or is hostile from the start (non-imaging files, zip
traversal, bombs, broken multipart). :data:`CASES` lists them as families x variants; each
builds a :class:`Request` from the :class:`Materials` on demand.
"""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import phantoms
import pydicom
from dicom_synth import write_dicom_series

from core.ingest.nifti import load_nifti_dwi

Expect = Literal["refused", "refused-or-failed", "succeeds"]
FileField = tuple[str, tuple[str, bytes]]


@dataclass(frozen=True)
class Materials:
    """The valid study every corruption starts from: a 40 x 36 x 4 x 8 phantom."""

    nii: bytes  # uncompressed NIfTI-1, float32, vox_offset 352
    bval: bytes
    bvec: bytes
    dicom: tuple[bytes, ...]  # the same study as 32 classic MR DICOM files
    real_dwi: Path  # the real cervical study (for the final "still works" check)

    @property
    def n_volumes(self) -> int:
        return len(self.bval.split())


def build_materials(folder: Path, real_dwi: Path) -> Materials:
    info = phantoms.region_phantom(folder / "phantom", n_dirs=6)
    image = Path(info["image"])  # type: ignore[arg-type]
    img = nib.load(str(image))
    plain = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    buffer = io.BytesIO()
    plain.to_file_map(plain.make_file_map({"image": buffer, "header": buffer}))
    bval, bvec = image.with_name("phantom.bval"), image.with_name("phantom.bvec")
    dwi = load_nifti_dwi(image, bval=bval, bvec=bvec)
    paths = write_dicom_series(image, dwi.bvals, dwi.bvecs, folder / "dicom")
    return Materials(buffer.getvalue(), bval.read_bytes(), bvec.read_bytes(), tuple(p.read_bytes() for p in paths), real_dwi)


@dataclass
class Request:
    """One POST /v1/jobs: a form (httpx ``files``/``data``), or a raw body with its headers."""

    files: list[FileField] | None = None
    data: dict[str, str] | None = None
    content: bytes | Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    family: str
    name: str
    build: Callable[[Materials], Request]
    expect: Expect = "refused-or-failed"

    @property
    def id(self) -> str:
        return f"{self.family}:{self.name}"


CASES: list[Case] = []


def case(family: str, name: str, expect: Expect = "refused-or-failed") -> Callable[[Callable[[Materials], Request]], None]:
    def register(build: Callable[[Materials], Request]) -> None:
        CASES.append(Case(family, name, build, expect))

    return register


def add(family: str, name: str, build: Callable[[Materials], Request], expect: Expect = "refused-or-failed") -> None:
    CASES.append(Case(family, name, build, expect))


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

NIFTI1 = {  # header field -> (offset, struct code, count)
    "sizeof_hdr": (0, "i", 1), "dim": (40, "h", 8), "datatype": (70, "h", 1), "bitpix": (72, "h", 1),
    "pixdim": (76, "f", 8), "vox_offset": (108, "f", 1), "scl_slope": (112, "f", 1), "scl_inter": (116, "f", 1),
    "qform_code": (252, "h", 1), "sform_code": (254, "h", 1), "srow_x": (280, "f", 4), "srow_y": (296, "f", 4),
    "srow_z": (312, "f", 4), "magic": (344, "4s", 1),
}  # fmt: skip


def forge(nii: bytes, **fields: Any) -> bytes:
    """``nii`` with NIfTI-1 header fields overwritten (little-endian, as the phantom is)."""
    raw = bytearray(nii)
    for name, value in fields.items():
        offset, code, count = NIFTI1[name]
        values = list(value) if count > 1 else [value]
        struct.pack_into("<" + code * len(values), raw, offset, *values)
    return bytes(raw)


def dims(*shape: int) -> list[int]:
    """A NIfTI-1 ``dim`` field for ``shape`` (int16 wrap-around, as a forger would write it)."""
    wrapped = [s - 65536 if s > 32767 else s for s in shape]
    return [len(shape), *wrapped, *([1] * (7 - len(shape)))]


def gradients_for(n: int) -> tuple[bytes, bytes]:
    """A plausible FSL table for ``n`` volumes (b=0 first), so the gateway's count check passes
    and only the worker can find what is wrong with the image."""
    n = max(n, 1)
    dirs = phantoms.gradient_scheme(max(n - 1, 1))[: n - 1]
    bvals = [0.0] + [800.0] * (n - 1)
    vecs = np.concatenate([[[0.0, 0.0, 0.0]], dirs])[:n]
    bvec = "\n".join(" ".join(f"{v:.6f}" for v in row) for row in vecs.T) + "\n"
    return " ".join(f"{b:g}" for b in bvals).encode() + b"\n", bvec.encode()


def nifti_form(m: Materials, image: bytes, *, name: str = "dwi.nii", bval: bytes | None = None, bvec: bytes | None = None) -> Request:
    files: list[FileField] = [("files", (name, image))]
    files.append(("bval", ("dwi.bval", m.bval if bval is None else bval)))
    files.append(("bvec", ("dwi.bvec", m.bvec if bvec is None else bvec)))
    return Request(files=files)


def forged_study(image: Callable[[Materials], bytes], *, volumes: int | None = None, gz: bool = False) -> Callable[[Materials], Request]:
    """A NIfTI study whose image is ``image(m)``; with ``volumes``, gradients for that count."""

    def build(m: Materials) -> Request:
        data = image(m)
        bval, bvec = gradients_for(volumes) if volumes is not None else (None, None)
        if gz:
            return nifti_form(m, gzip.compress(data, mtime=0), name="dwi.nii.gz", bval=bval, bvec=bvec)
        return nifti_form(m, data, bval=bval, bvec=bvec)

    return build


def files_form(*files: tuple[str, bytes]) -> Request:
    return Request(files=[("files", f) for f in files])


def zip_bytes(entries: list[tuple[str | zipfile.ZipInfo, bytes]], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def symlink_entry(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = 0o120777 << 16
    return info, target.encode()


def dicom_zip(files: list[bytes] | tuple[bytes, ...], *, prefix: str = "DICOM/") -> Request:
    return files_form(("study.zip", zip_bytes([(f"{prefix}IM{i:04d}", data) for i, data in enumerate(files)])))


def edit_dicom(raw: bytes, edit: Callable[[pydicom.Dataset], None]) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(raw))
    edit(ds)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def patch_transfer_syntax(raw: bytes, uid: str) -> bytes:
    """Declare another transfer syntax in the file meta, leaving the data set as it is."""
    at = raw.index(b"\x02\x00\x10\x00UI")
    old_length = struct.unpack_from("<H", raw, at + 6)[0]
    value = uid.encode() + (b"\0" if len(uid) % 2 else b"")
    patched = raw[: at + 6] + struct.pack("<H", len(value)) + value + raw[at + 8 + old_length :]
    group = patched.index(b"\x02\x00\x00\x00UL")
    length = struct.unpack_from("<I", patched, group + 8)[0] + len(value) - old_length
    return patched[: group + 8] + struct.pack("<I", length) + patched[group + 12 :]


def multipart(parts: list[tuple[bytes, bytes]], *, boundary: bytes = b"scsnet-hostile", end: bytes | None = None) -> bytes:
    """A multipart body from (raw header block, data) parts; ``end`` replaces the closing line."""
    body = b"".join(b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + data + b"\r\n" for headers, data in parts)
    return body + (b"--" + boundary + b"--\r\n" if end is None else end)


def raw_form(body: bytes, *, content_type: str = "multipart/form-data; boundary=scsnet-hostile") -> Request:
    return Request(content=body, headers={"Content-Type": content_type})


def disposition(name: str, filename: str | None = "f") -> bytes:
    text = f'Content-Disposition: form-data; name="{name}"'
    return (text + (f'; filename="{filename}"' if filename is not None else "")).encode()


# ----------------------------------------------------------------------------------------------
# NIfTI header forgeries (the gateway reads dims only; the worker must catch the rest)
# ----------------------------------------------------------------------------------------------

for value in (0, -1, 8, 9, 127, -32768):
    add("nifti-dims", f"dim0={value}", forged_study(lambda m, v=value: forge(m.nii, dim=[v, 40, 36, 4, 8, 1, 1, 1])))
for axis in (1, 2, 3):
    for value in (0, -1, -32768):
        edited = [40, 36, 4, 8]
        edited[axis - 1] = value
        add("nifti-dims", f"dim{axis}={value}", forged_study(lambda m, s=tuple(edited): forge(m.nii, dim=[4, *s, 1, 1, 1])))
for shape in ((65535, 65535, 65535, 8), (32767, 32767, 32767, 8), (4000, 4000, 15, 8), (40, 36, 4, 9), (40, 36, 5, 8),
              (40, 36, 4, 8, 2), (40, 36, 4, 32767)):  # fmt: skip
    label = "x".join(map(str, shape))
    add("nifti-dims", f"declares {label}", forged_study(lambda m, s=shape: forge(m.nii, dim=dims(*s)), volumes=shape[3]))
    add("nifti-dims", f"declares {label} gz", forged_study(lambda m, s=shape: forge(m.nii, dim=dims(*s)), volumes=shape[3], gz=True))


def _nifti2_huge(m: Materials) -> bytes:
    header = bytearray(544)
    struct.pack_into("<i8s", header, 0, 540, b"n+2\0\r\n\x1a\n")
    struct.pack_into("<hh", header, 12, 16, 32)
    struct.pack_into("<8q", header, 16, 4, 65535, 65535, 65535, 8, 1, 1, 1)
    struct.pack_into("<8d", header, 104, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<q", header, 168, 544)
    return bytes(header) + b"\0" * 4096


add("nifti-dims", "NIfTI-2 declares 65535^3 x 8 in 4 kB", forged_study(_nifti2_huge, volumes=8))
add("nifti-dims", "NIfTI-2 declares 65535^3 x 8 in 4 kB gz", forged_study(_nifti2_huge, volumes=8, gz=True))

for code in (0, 1, 3, 5, 6, 7, 9, 10, 32, 128, 1792, 2048, 2304, 4096, 32767, -1):
    add("nifti-datatype", f"datatype={code}", forged_study(lambda m, c=code: forge(m.nii, datatype=c)))

for offset in (-1.0, -352.0, 1e9, 2.0**31, 1e30, float("inf"), float("-inf"), float("nan")):
    add("nifti-vox_offset", f"vox_offset={offset:g}", forged_study(lambda m, v=offset: forge(m.nii, vox_offset=v)))
add("nifti-vox_offset", "vox_offset=file size", forged_study(lambda m: forge(m.nii, vox_offset=float(len(m.nii)))))
add("nifti-vox_offset", "vox_offset=file size - 16", forged_study(lambda m: forge(m.nii, vox_offset=float(len(m.nii) - 16))))

for value in (0, 1, 347, 349, 540, -1, 2**31 - 1):
    add("nifti-sizeof_hdr", f"sizeof_hdr={value}", forged_study(lambda m, v=value: forge(m.nii, sizeof_hdr=v)))

for magic in (b"xxxx", b"\0\0\0\0", b"n+2\0", b"N+1\0", b"n+1 ", b"ni2\0"):
    add("nifti-magic", f"magic={magic!r}", forged_study(lambda m, g=magic: forge(m.nii, magic=g)))

for cut in (1, 100, 347, 348, 352, 1000, 0.5, -4, -1):
    label = f"{cut:g} of the file" if isinstance(cut, float) else f"{cut} bytes"
    add("nifti-truncated", f"cut at {label}", forged_study(lambda m, c=cut: m.nii[: int(len(m.nii) * c) if isinstance(c, float) else c]))
add("nifti-truncated", "empty file", forged_study(lambda m: b""))
add("nifti-truncated", "cut at half, then gzipped", forged_study(lambda m: m.nii[: len(m.nii) // 2], gz=True))


# ----------------------------------------------------------------------------------------------
# Corrupt gzip
# ----------------------------------------------------------------------------------------------


def _gz(m: Materials) -> bytes:
    return gzip.compress(m.nii, mtime=0)


def _flip(data: bytes, at: int) -> bytes:
    raw = bytearray(data)
    raw[at] ^= 0xFF
    return bytes(raw)


GZIP_CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "header only": lambda g: g[:10],
    "cut after the header": lambda g: g[:40],
    "cut at a quarter": lambda g: g[: len(g) // 4],
    "cut at half": lambda g: g[: len(g) // 2],
    "trailer missing": lambda g: g[:-8],
    "last byte missing": lambda g: g[:-1],
    "CRC flipped": lambda g: _flip(g, len(g) - 8),
    "size flipped": lambda g: _flip(g, len(g) - 2),
    "deflate byte 12 flipped": lambda g: _flip(g, 12),
    "deflate byte 200 flipped": lambda g: _flip(g, 200),
    "deflate middle flipped": lambda g: _flip(g, len(g) // 2),
    "deflate stream replaced by junk": lambda g: g[:10] + bytes(range(256)) * 4,
    "gzip of a gzip": lambda g: gzip.compress(g, mtime=0),
    "bad compression method": lambda g: g[:2] + b"\x07" + g[3:],
}
for label, corrupt in GZIP_CORRUPTIONS.items():
    add("gzip-corrupt", label, lambda m, c=corrupt: nifti_form(m, c(_gz(m)), name="dwi.nii.gz"))
add("gzip-corrupt", "gzipped junk named .nii.gz", lambda m: nifti_form(m, gzip.compress(b"\x01\x02" * 5000), name="dwi.nii.gz"))


# ----------------------------------------------------------------------------------------------
# Voxel values
# ----------------------------------------------------------------------------------------------


def _with_data(edit: Callable[[np.ndarray], np.ndarray]) -> Callable[[Materials], bytes]:
    def image(m: Materials) -> bytes:
        img = nib.Nifti1Image.from_bytes(m.nii)
        data = edit(np.asarray(img.dataobj, dtype=np.float32).copy())
        out = nib.Nifti1Image(data.astype(np.float32), img.affine)
        return bytes(out.to_bytes())

    return image


def _set(a: np.ndarray, where: tuple[Any, ...], value: float) -> np.ndarray:
    a[where] = value
    return a


VOXELS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "one NaN voxel": lambda a: _set(a, (20, 18, 1, 3), np.nan),
    "NaN in the cord": lambda a: np.where(a > 500, np.nan, a),
    "all NaN": lambda a: np.full_like(a, np.nan),
    "one +inf voxel": lambda a: _set(a, (0, 0, 0, 0), np.inf),
    "-inf in the b=0": lambda a: _set(a, (slice(None), slice(None), slice(None), 0), -np.inf),
    "+inf in the cord": lambda a: np.where(a > 500, np.inf, a),
}
for label, edit in VOXELS.items():
    add("nan-inf", label, forged_study(_with_data(edit)))
    add("nan-inf", label + " gz", forged_study(_with_data(edit), gz=True))
# (A NaN or infinite scl_slope means "unscaled" to nibabel, so those files are valid.)
add("nan-inf", "scl_slope=1e38 overflows", forged_study(lambda m: forge(m.nii, scl_slope=1e38)))
add("nan-inf", "scl_inter=NaN", forged_study(lambda m: forge(m.nii, scl_slope=1.0, scl_inter=float("nan"))))
add("nan-inf", "srow all NaN", forged_study(lambda m: forge(m.nii, qform_code=0, sform_code=1, srow_x=[np.nan] * 4, srow_y=[np.nan] * 4, srow_z=[np.nan] * 4)))
add("nan-inf", "srow all zero (no voxel size)", forged_study(lambda m: forge(m.nii, qform_code=0, sform_code=1, srow_x=[0] * 4, srow_y=[0] * 4, srow_z=[0] * 4)))


# ----------------------------------------------------------------------------------------------
# Gradient tables
# ----------------------------------------------------------------------------------------------


def _rows(text: bytes) -> list[list[str]]:
    return [line.split() for line in text.decode().splitlines() if line.strip()]


def _table(rows: list[list[str]]) -> bytes:
    return ("\n".join(" ".join(r) for r in rows) + "\n").encode()


GRADIENTS: dict[str, Callable[[Materials], tuple[bytes | None, bytes | None]]] = {
    "one b-value too few": lambda m: (b" ".join(m.bval.split()[:-1]), None),
    "one b-value too many": lambda m: (m.bval.strip() + b" 0", None),
    "one b-vector too few": lambda m: (None, _table([r[:-1] for r in _rows(m.bvec)])),
    "one b-vector too many": lambda m: (None, _table([[*r, "0"] for r in _rows(m.bvec)])),
    "b-vectors of 4 rows": lambda m: (None, _table([*_rows(m.bvec), _rows(m.bvec)[0]])),
    "b-vectors of 2 rows": lambda m: (None, _table(_rows(m.bvec)[:2])),
    "b-values in 2 rows": lambda m: (_table([m.bval.decode().split()[:4], m.bval.decode().split()[4:]]), None),
    "ragged b-vectors": lambda m: (None, _table([_rows(m.bvec)[0], _rows(m.bvec)[1][:-2], _rows(m.bvec)[2]])),
    "empty b-values": lambda m: (b"", None),
    "empty b-vectors": lambda m: (None, b"\n\n"),
    "b-values are words": lambda m: (b"zero eight hundred " * 3, None),
    "b-values are binary": lambda m: (bytes(range(256)), None),
    "b-values in UTF-16": lambda m: (m.bval.decode().encode("utf-16"), None),
    "b-values over 1 MiB": lambda m: (b"0 " * (600 * 1024), None),
    "NaN b-value": lambda m: (m.bval.replace(b"800", b"nan", 1), None),
    "inf b-vector": lambda m: (None, m.bvec.replace(b"0.", b"inf", 1)),
    "negative b-value": lambda m: (m.bval.replace(b"800", b"-800", 1), None),
    "no b=0 volume": lambda m: (b" ".join([b"800"] * m.n_volumes), None),
    "all b=0": lambda m: (b" ".join([b"0"] * m.n_volumes), None),
    "b-vectors all along x": lambda m: (None, _table([["1"] * m.n_volumes, ["0"] * m.n_volumes, ["0"] * m.n_volumes])),
    "b-vectors of length 2": lambda m: (None, _table([[f"{2 * float(v):g}" for v in r] for r in _rows(m.bvec)])),
    "b-vectors all zero": lambda m: (None, _table([["0"] * m.n_volumes] * 3)),
    "bval and bvec swapped": lambda m: (m.bvec, m.bval),
    "b-values of 1e999": lambda m: (m.bval.replace(b"800", b"1e999"), None),
}
for label, make in GRADIENTS.items():
    add("gradients", label, lambda m, f=make: nifti_form(m, m.nii, bval=f(m)[0], bvec=f(m)[1]))
add("gradients", "no gradient files", lambda m: files_form(("dwi.nii", m.nii)))
add("gradients", "bval without bvec", lambda m: Request(files=[("files", ("dwi.nii", m.nii)), ("bval", ("b", m.bval))]))
add("gradients", "two bval files", lambda m: Request(files=[*(nifti_form(m, m.nii).files or []), ("bval", ("b2", m.bval))]))


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------

TRUNCATIONS: dict[str, Callable[[bytes], bytes]] = {
    "to half": lambda d: d[: len(d) // 2],
    "to 300 bytes": lambda d: d[:300],
    "to the preamble": lambda d: d[:132],
    "pixel data cut by 2 bytes": lambda d: d[:-2],
}
for label, truncate in TRUNCATIONS.items():
    add("dicom-truncated", f"every file {label}", lambda m, c=truncate: dicom_zip([c(d) for d in m.dicom]))
add("dicom-truncated", "every file to half, as files", lambda m: files_form(*[(f"IM{i}", d[: len(d) // 2]) for i, d in enumerate(m.dicom)]))
add("dicom-truncated", "every file to half, gzipped", lambda m: dicom_zip([gzip.compress(d[: len(d) // 2]) for d in m.dicom]))
add("dicom-truncated", "gzipped files cut short", lambda m: dicom_zip([gzip.compress(d)[:-20] for d in m.dicom]))

PREAMBLES: dict[str, Callable[[bytes], bytes]] = {
    "DICM magic replaced": lambda d: d[:128] + b"DICX" + d[132:],
    "preamble missing": lambda d: d[128:],
    "preamble and magic missing": lambda d: d[132:],
    "preamble doubled": lambda d: d[:128] + d,
}
for label, change in PREAMBLES.items():
    add("dicom-preamble", label, lambda m, c=change: dicom_zip([c(d) for d in m.dicom]))
    add("dicom-preamble", label + ", as files", lambda m, c=change: files_form(*[(f"IM{i}.dcm", c(d)) for i, d in enumerate(m.dicom)]))

SYNTAXES = {
    "JPEG baseline": "1.2.840.10008.1.2.4.50",
    "JPEG 2000": "1.2.840.10008.1.2.4.90",
    "JPEG-LS": "1.2.840.10008.1.2.4.80",
    "RLE": "1.2.840.10008.1.2.5",
    "deflated": "1.2.840.10008.1.2.1.99",
    "explicit big endian": "1.2.840.10008.1.2.2",
    "unknown UID": "1.2.3.4.5.6.7",
    "not a UID": "banana",
}
for label, uid in SYNTAXES.items():
    add("dicom-transfer-syntax", label, lambda m, u=uid: dicom_zip([patch_transfer_syntax(d, u) for d in m.dicom]))


def _set_attrs(**attrs: Any) -> Callable[[pydicom.Dataset], None]:
    def edit(ds: pydicom.Dataset) -> None:
        for key, value in attrs.items():
            setattr(ds, key, value)

    return edit


GEOMETRY: dict[str, dict[str, Any]] = {
    "rows=65535 columns=65535": {"Rows": 65535, "Columns": 65535},
    "rows=0": {"Rows": 0},
    "columns=0": {"Columns": 0},
    "rows=1 columns=1": {"Rows": 1, "Columns": 1},
    "rows=65535": {"Rows": 65535},
    "bits allocated 0": {"BitsAllocated": 0},
    "bits allocated 64": {"BitsAllocated": 64, "BitsStored": 64, "HighBit": 63},
    "3 samples per pixel": {"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB", "PlanarConfiguration": 0},
    "100000 frames": {"NumberOfFrames": 100000},
}
for label, attrs in GEOMETRY.items():
    add("dicom-geometry", label, lambda m, a=attrs: dicom_zip([edit_dicom(d, _set_attrs(**a)) for d in m.dicom]))


def _split_series(m: Materials) -> Request:
    """Volumes 0-3 and 4-7 under two series UIDs: neither half holds six directions."""
    other = pydicom.uid.generate_uid()
    files = [edit_dicom(d, _set_attrs(SeriesInstanceUID=other)) if i >= len(m.dicom) // 2 else d for i, d in enumerate(m.dicom)]
    return dicom_zip(files)


def _without_uids(ds: pydicom.Dataset) -> None:
    del ds.SeriesInstanceUID, ds.SOPInstanceUID


def _no_diffusion(ds: pydicom.Dataset) -> None:
    for keyword in ("DiffusionBValue", "DiffusionGradientDirectionSequence", "DiffusionDirectionality"):
        if keyword in ds:
            delattr(ds, keyword)


add("dicom-series", "two half series", _split_series)
add("dicom-series", "no diffusion attributes", lambda m: dicom_zip([edit_dicom(d, _no_diffusion) for d in m.dicom]))
add("dicom-series", "b=0 images only", lambda m: dicom_zip([d for i, d in enumerate(m.dicom) if i < 4 or i >= 28] * 2))
add("dicom-series", "one image", lambda m: files_form(("IM0001.dcm", m.dicom[0])))
add("dicom-series", "six images", lambda m: dicom_zip(list(m.dicom[:6])))
add("dicom-series", "one image 32 times", lambda m: dicom_zip([m.dicom[0]] * 32))
add("dicom-series", "DICOM with a NIfTI", lambda m: files_form(("IM1.dcm", m.dicom[0]), ("dwi.nii", m.nii)))
add("dicom-series", "DICOM with a bval", lambda m: Request(files=[("files", ("IM1.dcm", d)) for d in m.dicom] + [("bval", ("b", m.bval))]))
add("dicom-series", "DICOM with a text file", lambda m: files_form(*[(f"IM{i}", d) for i, d in enumerate(m.dicom)], ("notes.txt", b"hello")))
add("dicom-series", "a zip of DICOM with a NIfTI", lambda m: files_form(("study.zip", zip_bytes([(f"IM{i}", d) for i, d in enumerate(m.dicom)])), ("dwi.nii", m.nii)))
add("dicom-series", "no SOP instance or series UID", lambda m: dicom_zip([edit_dicom(d, _without_uids) for d in m.dicom]))
add("dicom-series", "a bare minimal data set", lambda m: files_form(("a.dcm", b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x14\x001.2.840.10008.1.2.1\0")))


# ----------------------------------------------------------------------------------------------
# Files that are not images at all
# ----------------------------------------------------------------------------------------------

ELF = b"\x7fELF\x02\x01\x01\0" + b"\0" * 8 + b"\x02\0\x3e\0\x01\0\0\0" + b"\0" * 1000
NOT_IMAGES: dict[str, bytes] = {
    "PDF": b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n" + b"\x80\x81" * 100,
    "PNG": b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10\0\0\0\x10\x08\x02\0\0\0\x90\x91h6" + b"\0" * 200,
    "JPEG": b"\xff\xd8\xff\xe0\0\x10JFIF\0\x01\x01" + b"\0" * 300 + b"\xff\xd9",
    "GIF": b"GIF89a\x10\0\x10\0\x80\0\0" + b"\0" * 100,
    "TIFF": b"II*\0\x08\0\0\0" + b"\0" * 300,
    "BMP": b"BM" + struct.pack("<I", 400) + b"\0" * 394,
    "plain text": b"Patient: DOE^JOHN\nThis is a radiology report, not an image.\n" * 20,
    "CSV": b"volume,bvalue\n0,0\n1,800\n" * 50,
    "JSON": b'{"EchoTime": 0.08, "RepetitionTime": 4.0}' * 20,
    "HTML": b"<!DOCTYPE html><html><body><script>alert(1)</script></body></html>" * 10,
    "SVG": b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
    "UTF-16 text": "un compte rendu, pas une image".encode("utf-16") * 20,
    "ELF executable": ELF,
    "Windows executable": b"MZ\x90\0\x03\0\0\0\x04\0\0\0\xff\xff\0\0" + b"\0" * 44 + b"\x80\0\0\0" + b"\0" * 64 + b"PE\0\0" + b"\0" * 400,
    "Mach-O executable": b"\xcf\xfa\xed\xfe\x07\0\0\x01" + b"\0" * 500,
    "shell script": b"#!/bin/sh\nrm -rf / --no-preserve-root\n",
    "Java class": b"\xca\xfe\xba\xbe\0\0\0\x34" + b"\0" * 200,
    "WebAssembly": b"\0asm\x01\0\0\0" + b"\0" * 100,
    "tar archive": b"dicom/IM0001".ljust(100, b"\0") + b"0000644\0" + b"\0" * 148 + b"ustar\x0000" + b"\0" * 255,
    "7-zip archive": b"7z\xbc\xaf\x27\x1c\0\x04" + b"\0" * 300,
    "RAR archive": b"Rar!\x1a\x07\x01\0" + b"\0" * 300,
    "bzip2": b"BZh91AY&SY" + b"\x01" * 300,
    "xz": b"\xfd7zXZ\0\0\x04" + b"\x01" * 300,
    "zstd": b"\x28\xb5\x2f\xfd" + b"\x01" * 300,
    "gzipped text": gzip.compress(b"a radiology report\n" * 100),
    "gzipped PNG": gzip.compress(b"\x89PNG\r\n\x1a\n" + b"\0" * 500),
    "one NUL byte": b"\0",
    "random bytes": np.random.default_rng(5).bytes(64 * 1024),
}
for label, payload in NOT_IMAGES.items():
    name = ("dwi.nii.gz", "IM0001.dcm", "study.zip")[len(label) % 3]
    add("not-an-image", label, lambda m, p=payload, n=name: files_form((n, p)), expect="refused")
add("not-an-image", "empty file", lambda m: files_form(("dwi.nii.gz", b"")), expect="refused")
add("not-an-image", "a zip of PDFs", lambda m: files_form(("study.zip", zip_bytes([(f"r{i}.pdf", NOT_IMAGES["PDF"]) for i in range(3)]))))
add("not-an-image", "a zip of text files", lambda m: files_form(("study.zip", zip_bytes([(f"IM{i}.dcm", b"not dicom\n" * 20) for i in range(10)]))))
add("not-an-image", "a zip of executables", lambda m: files_form(("study.zip", zip_bytes([("run.exe", NOT_IMAGES["Windows executable"]), ("run", ELF)]))))


# ----------------------------------------------------------------------------------------------
# Hostile zips
# ----------------------------------------------------------------------------------------------

for path in ("../evil.dcm", "../../../../etc/passwd", "/etc/passwd", "C:\\Windows\\evil.dcm", "C:/evil.dcm",
             "DICOM/../../evil.dcm", "..\\..\\evil.dcm", "./../evil.dcm", "DICOM/./../../../tmp/x"):  # fmt: skip
    add("zip-traversal", path, lambda m, p=path: files_form(("study.zip", zip_bytes([("DICOM/IM0001", m.dicom[0]), (p, m.dicom[1])]))), expect="refused")
for name, target in (("IM0002", "/etc/passwd"), ("IM0002.dcm", "../../../etc/shadow"), ("DICOM", "/"), ("link", "IM0001"),
                     ("a/b/c.dcm", "/proc/self/environ")):  # fmt: skip
    add("zip-symlink", f"{name} -> {target}", lambda m, n=name, t=target: files_form(("study.zip", zip_bytes([("IM0001", m.dicom[0]), symlink_entry(n, t)]))), expect="refused")

ZEROS_10M = b"\0" * (10 << 20)
add("zip-bomb", "one 40 MiB entry of zeros", lambda m: files_form(("bomb.zip", zip_bytes([("IM0001", b"\0" * (40 << 20))]))), expect="refused")
add("zip-bomb", "one 10 MiB entry of zeros (ratio 1000)", lambda m: files_form(("bomb.zip", zip_bytes([("IM0001", ZEROS_10M)]))))
add("zip-bomb", "ten 4 MiB entries of zeros", lambda m: files_form(("bomb.zip", zip_bytes([(f"IM{i}", ZEROS_10M[: 4 << 20]) for i in range(10)]))), expect="refused")
add("zip-bomb", "a 20 MiB gzip bomb inside", lambda m: files_form(("bomb.zip", zip_bytes([("IM0001.gz", gzip.compress(b"\0" * (20 << 20)))], compression=zipfile.ZIP_STORED))))
add("zip-bomb", "a 20 MiB gzip bomb uploaded bare", lambda m: files_form(("IM0001.dcm.gz", gzip.compress(b"\0" * (20 << 20)))))
add("zip-bomb", "bzip2 entry of 10 MiB zeros", lambda m: files_form(("bomb.zip", zip_bytes([("IM0001", ZEROS_10M)], compression=zipfile.ZIP_BZIP2))))
add("zip-bomb", "lzma entry of 10 MiB zeros", lambda m: files_form(("bomb.zip", zip_bytes([("IM0001", ZEROS_10M)], compression=zipfile.ZIP_LZMA))))
add("zip-bomb", "a zip of DICOM then 10 MiB of zeros", lambda m: files_form(("bomb.zip", zip_bytes([*[(f"IM{i}", d) for i, d in enumerate(m.dicom)], ("pad", ZEROS_10M)]))))
add("zip-many-entries", "301 entries", lambda m: files_form(("many.zip", zip_bytes([(f"IM{i:05d}", b"x") for i in range(301)]))), expect="refused")
add("zip-many-entries", "5000 empty entries", lambda m: files_form(("many.zip", zip_bytes([(f"IM{i:05d}", b"") for i in range(5000)]))), expect="refused")
add("zip-many-entries", "200 junk entries", lambda m: files_form(("many.zip", zip_bytes([(f"IM{i:05d}", b"junk") for i in range(200)]))))
add("zip-many-entries", "three zips of 150 entries", lambda m: files_form(*[(f"z{k}.zip", zip_bytes([(f"IM{i:05d}", b"x") for i in range(150)])) for k in range(3)]))


def _lying_sizes(m: Materials) -> bytes:
    """A zip whose central directory says an entry is 10 bytes long while it holds 5 MiB."""
    data = zip_bytes([("IM0001", ZEROS_10M[: 5 << 20])])
    at = data.index(b"PK\x01\x02")
    raw = bytearray(data)
    struct.pack_into("<I", raw, at + 24, 10)
    local = data.index(b"PK\x03\x04")
    struct.pack_into("<I", raw, local + 22, 10)
    return bytes(raw)


def _with_flag(bits: int = 0, method: int | None = None) -> Callable[[Materials], Request]:
    def build(m: Materials) -> Request:
        raw = bytearray(zip_bytes([("IM0001", m.dicom[0])]))
        for signature, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
            at = bytes(raw).index(signature)
            struct.pack_into("<H", raw, at + flag_at, struct.unpack_from("<H", raw, at + flag_at)[0] | bits)
            if method is not None:
                struct.pack_into("<H", raw, at + method_at, method)
        return files_form(("study.zip", bytes(raw)))

    return build


add("zip-malformed", "sizes in the directory lie", lambda m: files_form(("lie.zip", _lying_sizes(m))))
add("zip-malformed", "encrypted entry", _with_flag(bits=0x1))
add("zip-malformed", "compression method 99 (AES)", _with_flag(method=99))
add("zip-malformed", "compression method 42", _with_flag(method=42))
def _wrong_crc(m: Materials) -> Request:
    raw = bytearray(zip_bytes([(f"IM{i:04d}", d) for i, d in enumerate(m.dicom)]))
    for signature, crc_at in ((b"PK\x03\x04", 14), (b"PK\x01\x02", 16)):  # the first entry, in both headers
        at = bytes(raw).index(signature)
        raw[at + crc_at : at + crc_at + 4] = b"\xde\xad\xbe\xef"
    return files_form(("crc.zip", bytes(raw)))


add("zip-malformed", "CRC wrong", _wrong_crc)
add("zip-malformed", "central directory cut off", lambda m: files_form(("cut.zip", zip_bytes([(f"IM{i}", d) for i, d in enumerate(m.dicom)])[:-30])))
add("zip-malformed", "only the local headers", lambda m: files_form(("cut.zip", zip_bytes([(f"IM{i}", d) for i, d in enumerate(m.dicom)])[:5000])))
add("zip-malformed", "PK then junk", lambda m: files_form(("junk.zip", b"PK\x03\x04" + bytes(range(256)) * 10)), expect="refused")
add("zip-malformed", "empty zip", lambda m: files_form(("empty.zip", zip_bytes([]))))
add("zip-malformed", "directories only", lambda m: files_form(("dirs.zip", zip_bytes([("a/", b""), ("a/b/", b"")]))))
add("zip-malformed", "macOS resource forks only", lambda m: files_form(("mac.zip", zip_bytes([("__MACOSX/._IM0001", m.dicom[0]), ("._IM0002", m.dicom[1])]))))
add("zip-nested", "a zip in a zip", lambda m: files_form(("outer.zip", zip_bytes([("inner.zip", zip_bytes([(f"IM{i}", d) for i, d in enumerate(m.dicom)]))]))))
add("zip-nested", "three levels", lambda m: files_form(("o.zip", zip_bytes([("m.zip", zip_bytes([("i.zip", zip_bytes([("IM0", m.dicom[0])]))]))]))))
add("zip-nested", "a gzipped zip in a zip", lambda m: files_form(("o.zip", zip_bytes([("i.zip.gz", gzip.compress(zip_bytes([("IM0", m.dicom[0])])))]))))
add("zip-nested", "a zip named .dcm in a zip", lambda m: files_form(("o.zip", zip_bytes([("IM0001.dcm", zip_bytes([("IM0", m.dicom[0])]))]))))
add("zip-nested", "a gzipped zip uploaded bare", lambda m: files_form(("study.zip.gz", gzip.compress(zip_bytes([("IM0", m.dicom[0])])))))
add("zip-nested", "a NIfTI in a zip", lambda m: files_form(("nifti.zip", zip_bytes([("dwi.nii", m.nii), ("dwi.bval", m.bval), ("dwi.bvec", m.bvec)]))))


# ----------------------------------------------------------------------------------------------
# Request bodies: size, content type, multipart structure
# ----------------------------------------------------------------------------------------------

CAP = 4 << 20  # SCSNET_MAX_UPLOAD_BYTES of the test service


def _streamed(total: int) -> Any:
    def body() -> Any:
        yield b'--scsnet-hostile\r\nContent-Disposition: form-data; name="files"; filename="a"\r\n\r\n'
        for _ in range(total // (64 << 10)):
            yield b"\0" * (64 << 10)
        yield b"\r\n--scsnet-hostile--\r\n"

    return body()


add("oversize", "one file over the cap", lambda m: files_form(("big.nii", b"\0" * (CAP + 1))), expect="refused")
add("oversize", "many small files over the cap", lambda m: files_form(*[(f"IM{i}", b"\1" * (256 << 10)) for i in range(17)]), expect="refused")
add("oversize", "streamed without Content-Length", lambda m: Request(content=_streamed(CAP + (1 << 20)), headers={"Content-Type": "multipart/form-data; boundary=scsnet-hostile"}), expect="refused")
add("oversize", "streamed 6x the cap", lambda m: Request(content=_streamed(6 * CAP), headers={"Content-Type": "multipart/form-data; boundary=scsnet-hostile"}), expect="refused")
add("oversize", "callback_url of 10 kB", lambda m: Request(files=nifti_form(m, m.nii).files, data={"callback_url": "https://example.org/" + "a" * 10_000}), expect="refused")

CONTENT_TYPES = {
    "application/json": b'{"files": ["dwi.nii"]}',
    "text/plain": b"dwi.nii",
    "application/octet-stream": b"\0" * 1000,
    "application/x-www-form-urlencoded": b"files=dwi.nii&bval=0",
    "multipart/mixed; boundary=scsnet-hostile": None,
    "multipart/form-data": None,
    "multipart/form-data; boundary=": None,
    "multipart/form-data; boundary=\"\"": None,
    "image/png": NOT_IMAGES["PNG"],
    "application/dicom": None,
    "": None,
    "multipart/form-data; charset=utf-8": None,
}
for ctype, declared_body in CONTENT_TYPES.items():

    def _build(m: Materials, c: str = ctype, p: bytes | None = declared_body) -> Request:
        body = p if p is not None else multipart([(disposition("files", "IM1.dcm"), m.dicom[0])])
        return Request(content=body, headers={"Content-Type": c})

    add("content-type", ctype or "(empty)", _build, expect="refused")
add("content-type", "no Content-Type header", lambda m: Request(content=multipart([(disposition("files"), m.dicom[0])])), expect="refused")

FILES_PART = disposition("files", "dwi.nii")
MULTIPART: dict[str, Callable[[Materials], Request]] = {
    "boundary differs from the header": lambda m: raw_form(multipart([(FILES_PART, m.nii)], boundary=b"other")),
    "no closing boundary": lambda m: raw_form(multipart([(FILES_PART, m.nii)], end=b"")),
    "cut inside a part": lambda m: raw_form(multipart([(FILES_PART, m.nii)])[:2000]),
    "cut inside the part headers": lambda m: raw_form(b"--scsnet-hostile\r\nContent-Dispo"),
    "only the closing boundary": lambda m: raw_form(b"--scsnet-hostile--\r\n"),
    "empty body": lambda m: raw_form(b""),
    "CRLF missing after the boundary": lambda m: raw_form(b"--scsnet-hostileContent-Disposition: form-data\r\n\r\nx\r\n--scsnet-hostile--\r\n"),
    "no Content-Disposition": lambda m: raw_form(multipart([(b"Content-Type: application/octet-stream", m.nii)])),
    "Content-Disposition: attachment": lambda m: raw_form(multipart([(b'Content-Disposition: attachment; name="files"', m.nii)])),
    "part without a name": lambda m: raw_form(multipart([(b'Content-Disposition: form-data; filename="dwi.nii"', m.nii)])),
    "unknown field": lambda m: raw_form(multipart([(FILES_PART, m.nii), (disposition("patient_name", None), b"DOE^JOHN")])),
    "field name of 10 kB": lambda m: raw_form(multipart([(disposition("f" * 10_000), m.nii)])),
    "header line without a colon": lambda m: raw_form(multipart([(b"Content-Disposition form-data name files", m.nii)])),
    "header of 64 kB": lambda m: raw_form(multipart([(FILES_PART + b"\r\nX-Junk: " + b"a" * (64 << 10), b"\0" * 400)])),
    "NUL in the part headers": lambda m: raw_form(multipart([(b'Content-Disposition: form-data; name="fil\0es"', m.nii)])),
    "non-UTF-8 field name": lambda m: raw_form(multipart([(b'Content-Disposition: form-data; name="\xff\xfe"', m.nii)])),
    "LF line ends only": lambda m: raw_form(multipart([(FILES_PART, m.nii)]).replace(b"\r\n", b"\n")),
    "no study, only gradients": lambda m: raw_form(multipart([(disposition("bval"), m.bval), (disposition("bvec"), m.bvec)])),
    "no study, only a callback": lambda m: raw_form(multipart([(disposition("callback_url", None), b"https://example.org/h")])),
    "empty files part": lambda m: raw_form(multipart([(FILES_PART, b"")])),
    "empty filename on junk": lambda m: raw_form(multipart([(disposition("files", ""), b"junk")])),
    "files field given as text": lambda m: raw_form(multipart([(disposition("files", None), b"dwi.nii")])),
    "duplicate bval and bvec": lambda m: raw_form(multipart([(FILES_PART, m.nii), (disposition("bval"), m.bval), (disposition("bval"), m.bval), (disposition("bvec"), m.bvec), (disposition("bvec"), m.bvec)])),
    "two NIfTI images": lambda m: raw_form(multipart([(FILES_PART, m.nii), (FILES_PART, m.nii), (disposition("bval"), m.bval), (disposition("bvec"), m.bvec)])),
    "10001 parts": lambda m: raw_form(multipart([(disposition("files"), b"x")] * 10_001)),
    "callback_url javascript:": lambda m: Request(files=nifti_form(m, m.nii).files, data={"callback_url": "javascript:alert(1)"}),
    "callback_url file:": lambda m: Request(files=nifti_form(m, m.nii).files, data={"callback_url": "file:///etc/passwd"}),
    "callback_url without host": lambda m: Request(files=nifti_form(m, m.nii).files, data={"callback_url": "https:///path"}),
    "a nested multipart/mixed part": lambda m: raw_form(multipart([(FILES_PART + b"\r\nContent-Type: multipart/mixed; boundary=inner", b"--inner\r\n\r\nx\r\n--inner--")])),
}
for label, make_request in MULTIPART.items():
    add("multipart", label, make_request, expect="refused")

# Names the client chooses are never used: a valid study under a hostile name simply works
# (or, for a name too long for a part header, is refused as malformed).
for filename in ("", "../../../../etc/passwd", "/etc/cron.d/x.nii", "C:\\Windows\\system32\\x.nii", "a\0b.nii.gz", "é" * 300 + ".nii",
                 "x" * 5000):  # fmt: skip
    add("hostile-filename", repr(filename)[:40], lambda m, f=filename: Request(files=[("files", (f, m.nii)), ("bval", (f, m.bval)), ("bvec", (f, m.bvec))]), expect="succeeds" if len(filename) < 4000 else "refused")
