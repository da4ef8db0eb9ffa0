"""Property-based fuzzing of the parsers that read untrusted bytes: the NIfTI loader and the
FSL gradient readers. Whatever they are given, the only exceptions that may come out are
:class:`~core.errors.InputError` subclasses (a 4xx problem with a sentence); anything else
would reach a user as an internal error.

Examples are bounded and derandomised (the same examples on every run), so CI stays
reproducible; every example's count is printed at the end of the module.
"""

from __future__ import annotations

import gzip
import io
import struct
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from core.errors import InputError
from core.ingest.gradients import check_gradients, read_bvals, read_bvecs
from core.ingest.nifti import load_nifti_dwi, load_nifti_image

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

FUZZ = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
EXAMPLES: Counter[str] = Counter()
_SCRATCH = Path(tempfile.mkdtemp(prefix="scsfz"))


def only_input_errors(call: Callable[[], object]) -> object:
    """Run ``call``; an :class:`InputError` is an acceptable outcome, anything else fails."""
    try:
        return call()
    except InputError as exc:
        assert exc.detail.strip(), f"{type(exc).__name__} without a sentence"
        assert str(_SCRATCH) not in exc.detail, f"the sentence shows the server's folders: {exc.detail}"
        return exc


def _scratch_file(name: str, data: bytes) -> Path:
    path = _SCRATCH / name
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------------------------
# NIfTI
# ----------------------------------------------------------------------------------------------


SHAPE = (4, 3, 2, 8)


def _valid_nifti(version: int, *, big_endian: bool = False) -> bytes:
    """A small valid 4D float32 NIfTI-1 or NIfTI-2 DWI (uncompressed bytes); see :data:`BVAL`."""
    data = np.random.default_rng(0).random(SHAPE, dtype=np.float32) * 100 + 1
    cls = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    img = cls(data, np.diag([1.0, 1.0, 2.0, 1.0]))
    if big_endian:
        img = cls(data.astype(">f4"), img.affine, img.header.as_byteswapped(">"))
    buffer = io.BytesIO()
    file_map = img.make_file_map({"image": buffer, "header": buffer})
    img.to_file_map(file_map)
    return buffer.getvalue()


BASES = {(v, be): _valid_nifti(v, big_endian=be) for v in (1, 2) for be in (False, True)}
_DIRECTIONS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.7071, 0.7071, 0], [0.7071, 0, 0.7071], [0, 0.7071, 0.7071], [0.5774, 0.5774, 0.5774]])
BVAL = _SCRATCH / "base.bval"
BVEC = _SCRATCH / "base.bvec"
BVAL.write_text("0 " + " ".join(["800"] * 7) + "\n")
BVEC.write_text("\n".join(" ".join(f"{v:g}" for v in row) for row in np.vstack([[0, 0, 0], _DIRECTIONS]).T) + "\n")

# (offset, struct code) of the header fields most worth forging, per NIfTI version.
NIFTI1_FIELDS: dict[str, tuple[int, str]] = {
    "sizeof_hdr": (0, "i"),
    "dim_info": (39, "B"),
    **{f"dim{i}": (40 + 2 * i, "h") for i in range(8)},
    "intent_code": (68, "h"),
    "datatype": (70, "h"),
    "bitpix": (72, "h"),
    **{f"pixdim{i}": (76 + 4 * i, "f") for i in range(8)},
    "vox_offset": (108, "f"),
    "scl_slope": (112, "f"),
    "scl_inter": (116, "f"),
    "slice_code": (122, "B"),
    "xyzt_units": (123, "B"),
    "qform_code": (252, "h"),
    "sform_code": (254, "h"),
    **{name: (256 + 4 * i, "f") for i, name in enumerate(("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"))},
    **{f"srow{i}": (280 + 4 * i, "f") for i in range(12)},
}
NIFTI2_FIELDS: dict[str, tuple[int, str]] = {
    "sizeof_hdr": (0, "i"),
    "datatype": (12, "h"),
    "bitpix": (14, "h"),
    **{f"dim{i}": (16 + 8 * i, "q") for i in range(8)},
    "scl_slope": (176, "d"),
    "scl_inter": (184, "d"),
    **{f"pixdim{i}": (104 + 8 * i, "d") for i in range(8)},
    "vox_offset": (168, "q"),
    "qform_code": (344, "i"),
    "sform_code": (348, "i"),
    **{f"srow{i}": (400 + 8 * i, "d") for i in range(12)},
}
MAGIC_OFFSET = {1: 344, 2: 4}

_INT_RANGES = {"B": (0, 255), "h": (-(2**15), 2**15 - 1), "i": (-(2**31), 2**31 - 1), "q": (-(2**63), 2**63 - 1)}
_INTERESTING = [-(2**15), -1, 0, 1, 2, 3, 4, 5, 7, 8, 16, 32, 64, 128, 255, 256, 348, 352, 540, 544, 1792, 2304, 32767, 65535]


def _value_for(code: str) -> st.SearchStrategy[int | float]:
    if code in ("f", "d"):
        return st.one_of(
            st.sampled_from([0.0, -0.0, 1.0, -1.0, 352.0, 1e30, -1e30, float("nan"), float("inf"), float("-inf")]),
            st.floats(width=32 if code == "f" else 64, allow_nan=True, allow_infinity=True),
        )
    lo, hi = _INT_RANGES[code]
    return st.one_of(st.sampled_from([v for v in _INTERESTING if lo <= v <= hi]), st.integers(lo, hi))


@st.composite
def forged_niftis(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid small NIfTI with forged header fields, flipped bytes, a forged magic, a
    truncation and/or a gzip wrapper (itself possibly cut short)."""
    version = draw(st.sampled_from([1, 2]))
    big_endian = draw(st.booleans())
    raw = bytearray(BASES[(version, big_endian)])
    fields = NIFTI1_FIELDS if version == 1 else NIFTI2_FIELDS
    endian = ">" if big_endian else "<"
    for name in draw(st.lists(st.sampled_from(sorted(fields)), min_size=0, max_size=4)):
        offset, code = fields[name]
        value = draw(_value_for(code))
        struct.pack_into(endian + code, raw, offset, value)
    if draw(st.integers(0, 4)) == 0:
        raw[MAGIC_OFFSET[version] : MAGIC_OFFSET[version] + 4] = draw(
            st.sampled_from([b"n+1\0", b"ni1\0", b"n+2\0", b"ni2\0", b"\0\0\0\0", b"xxxx"])
        )
    for _ in range(draw(st.integers(0, 3))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    if draw(st.integers(0, 3)) == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]
    if draw(st.booleans()):
        packed = gzip.compress(bytes(raw), mtime=0)
        if draw(st.integers(0, 3)) == 0:
            packed = packed[: draw(st.integers(0, len(packed)))]
        return "fuzz.nii.gz", packed
    return "fuzz.nii", bytes(raw)


@FUZZ
@given(
    data=st.one_of(st.binary(max_size=1200), st.binary(max_size=600).map(lambda b: gzip.compress(b, mtime=0))),
    name=st.sampled_from(["fuzz.nii", "fuzz.nii.gz"]),
)
def test_random_bytes_never_escape_as_anything_but_input_errors(data: bytes, name: str) -> None:
    EXAMPLES["nifti: random bytes"] += 1
    only_input_errors(lambda: load_nifti_image(_scratch_file(name, data)))


@settings(FUZZ, max_examples=1000)
@given(forged=forged_niftis())
def test_forged_nifti_headers_never_escape_as_anything_but_input_errors(forged: tuple[str, bytes]) -> None:
    EXAMPLES["nifti: forged headers"] += 1
    name, data = forged
    path = _scratch_file(name, data)
    outcome = only_input_errors(lambda: load_nifti_image(path))
    if not isinstance(outcome, InputError):  # it loaded: then it is what the docstring promises
        assert isinstance(outcome, tuple)
        array, affine = outcome
        assert array.dtype == np.float32 and 1 <= array.ndim <= 7 and min(array.shape) >= 1
        assert affine.shape == (4, 4) and affine.dtype == np.float64 and np.all(np.isfinite(affine))
    # and on through the gradients, their rotation into world space and the DWI's own checks
    dwi = only_input_errors(lambda: load_nifti_dwi(path, bval=BVAL, bvec=BVEC))
    if not isinstance(dwi, InputError):
        assert dwi.data.ndim == 4 and np.all(np.isfinite(dwi.data))  # type: ignore[attr-defined]


def test_the_unforged_bases_load() -> None:
    for (version, big_endian), raw in BASES.items():
        path = _scratch_file(f"base{version}{int(big_endian)}.nii", raw)
        assert load_nifti_image(path)[0].shape == SHAPE
        assert load_nifti_dwi(path, bval=BVAL, bvec=BVEC).data.shape == SHAPE


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dim1", 4000, "truncated"),  # 4000 x 3 x 2 x 8 float32 declared in a 1 kB file
        ("dim2", -1, "impossible dimensions"),
        ("datatype", 32, "complex"),
        ("datatype", 128, "colour"),
        ("vox_offset", float("inf"), "not a readable NIfTI"),
        ("srow0", float("nan"), "not finite"),
    ],
)
def test_specific_forgeries_get_specific_sentences(field: str, value: float, message: str) -> None:
    raw = bytearray(BASES[(1, False)])
    offset, code = NIFTI1_FIELDS[field]
    struct.pack_into("<" + code, raw, offset, value)
    for name, data in (("f.nii", bytes(raw)), ("f.nii.gz", gzip.compress(bytes(raw)))):
        with pytest.raises(InputError, match=message):
            load_nifti_image(_scratch_file(name, data))


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


@pytest.mark.parametrize(
    "corrupt",
    [lambda g: g[:-8], lambda g: g[:-1], lambda g: _flip(g, len(g) - 8), lambda g: _flip(g, len(g) - 2), lambda g: g + g[10:50]],
    ids=["trailer missing", "last byte missing", "CRC flipped", "length flipped", "trailing junk"],
)
def test_a_corrupt_gzip_stream_is_refused_even_where_the_image_bytes_decode(corrupt: Callable[[bytes], bytes]) -> None:
    with pytest.raises(InputError, match="gzip"):
        load_nifti_image(_scratch_file("c.nii.gz", corrupt(gzip.compress(BASES[(1, False)], mtime=0))))


def test_a_tiny_file_declaring_gigabytes_is_refused_without_allocating_them() -> None:
    raw = bytearray(BASES[(2, False)])
    struct.pack_into("<8q", raw, 16, 4, 4000, 4000, 15, 2, 1, 1, 1)  # 480 M voxels: under the cap
    for name, data in (("big.nii", bytes(raw)), ("big.nii.gz", gzip.compress(bytes(raw)))):
        with pytest.raises(InputError, match="truncated"):
            load_nifti_image(_scratch_file(name, data))


# ----------------------------------------------------------------------------------------------
# Gradient tables
# ----------------------------------------------------------------------------------------------

_TOKENS = st.sampled_from(
    ["0", "1000", "-5", "1e3", "1e999", "-1e999", "nan", "NaN", "inf", "-inf", "0.7071", ".5", "5.", "1_000", "0x10",
     "abc", "#", "# comment", ",", ";", "١٢", "\u00a0", "", "1,2", "--1", "+3", "1e", "e5", "\x00", "\t"]
)  # fmt: skip
_SEPARATORS = st.sampled_from([" ", "  ", "\t", ",", ", ", "\n", "\r\n", "\r", "\x0b", "\x0c", "\u2028"])


@st.composite
def gradient_texts(draw: st.DrawFn) -> bytes:
    """Gradient-file-like text: numbers and junk tokens with assorted separators and line ends,
    a regular table of random numbers, or arbitrary text and bytes."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        parts = []
        for token in draw(st.lists(_TOKENS, max_size=40)):
            parts += [token, draw(_SEPARATORS)]
        return "".join(parts).encode("utf-8")
    if kind == 1:
        rows, cols = draw(st.integers(1, 5)), draw(st.integers(1, 40))
        values = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=rows * cols, max_size=rows * cols))
        lines = [" ".join(repr(v) for v in values[r * cols : (r + 1) * cols]) for r in range(rows)]
        return "\n".join(lines).encode()
    if kind == 2:
        return draw(st.text(max_size=300)).encode("utf-8", "surrogatepass")
    return draw(st.binary(max_size=300))


@FUZZ
@given(text=gradient_texts())
def test_gradient_files_never_escape_as_anything_but_input_errors(text: bytes) -> None:
    EXAMPLES["gradients: bval/bvec text"] += 1
    path = _scratch_file("fuzz.bval", text)
    bvals = only_input_errors(lambda: read_bvals(path))
    if not isinstance(bvals, InputError):
        assert isinstance(bvals, np.ndarray) and bvals.ndim == 1 and np.all(np.isfinite(bvals)) and np.all(bvals >= 0)
    bvecs = only_input_errors(lambda: read_bvecs(path))
    if not isinstance(bvecs, InputError):
        assert isinstance(bvecs, np.ndarray) and bvecs.ndim == 2 and bvecs.shape[1] == 3


_FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=64)


@st.composite
def gradient_tables(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    """b-values and b-vectors of arbitrary shapes and values (including NaN, inf, huge and
    zero-length vectors), with a volume count that may or may not match."""
    n = draw(st.integers(0, 24))
    plausible = draw(st.booleans())
    bvals_shape = (n,) if plausible else draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=6))
    bvecs_shape = (n, 3) if plausible else draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=6))
    element = st.one_of(_FLOATS, st.sampled_from([0.0, 1.0, -1.0, 1000.0, 0.5773502691896258]))
    bvals = draw(hnp.arrays(np.float64, bvals_shape, elements=element))
    bvecs = draw(hnp.arrays(np.float64, bvecs_shape, elements=element))
    n_volumes = n if draw(st.integers(0, 3)) else draw(st.integers(0, 30))
    return bvals, bvecs, n_volumes


@FUZZ
@given(table=gradient_tables())
def test_gradient_tables_never_escape_as_anything_but_input_errors(table: tuple[np.ndarray, np.ndarray, int]) -> None:
    EXAMPLES["gradients: check_gradients arrays"] += 1
    bvals, bvecs, n_volumes = table
    outcome = only_input_errors(lambda: check_gradients(bvals, bvecs, n_volumes=n_volumes))
    if not isinstance(outcome, InputError):
        assert isinstance(outcome, tuple)
        clean_bvals, clean_bvecs = outcome
        assert clean_bvals.shape == (n_volumes,) and clean_bvecs.shape == (n_volumes, 3)
        assert np.allclose(np.linalg.norm(clean_bvecs[clean_bvals > 0], axis=1), 1.0)


def test_summary(capsys: pytest.CaptureFixture[str]) -> None:
    detail = ", ".join(f"{name}: {count}" for name, count in sorted(EXAMPLES.items()))
    with capsys.disabled():
        print(f"\nparser fuzzing (hypothesis): {sum(EXAMPLES.values())} examples ({detail})")
