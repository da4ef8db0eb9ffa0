"""The standard-library DICOM UID reader of the gateway (core/ingest/dicom_peek.py), checked
against pydicom on every file of the five-vendor corpus, in every transfer syntax it may meet,
and against broken and hostile bytes (only NotDicom may come out)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from core.ingest.dicom_peek import DicomIds, NotDicom, peek

ARCHIVES = sorted((Path(__file__).parent / "data" / "dicom").glob("*.tar.xz"))


def _corpus() -> list[tuple[str, bytes]]:
    files = []
    for archive in ARCHIVES:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.isfile() and "/In/" in member.name:
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    if len(data) > 132 and data[128:132] == b"DICM":
                        files.append((member.name, data))
    return files


CORPUS = _corpus()


def _expected(data: bytes) -> DicomIds:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return DicomIds(
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
    )


def test_the_corpus_covers_every_vendor_archive() -> None:
    assert len(ARCHIVES) >= 5
    assert len(CORPUS) > 1000
    assert {name.split("/", 1)[0] for name, _ in CORPUS} >= {a.name.removesuffix(".tar.xz") for a in ARCHIVES}


def test_every_corpus_file_gives_the_uids_pydicom_reads() -> None:
    instances = [(name, data) for name, data in CORPUS if not name.endswith("DICOMDIR")]
    mismatched = [name for name, data in instances if peek(io.BytesIO(data)) != _expected(data)]
    assert mismatched == []


def test_a_dicomdir_is_no_instance() -> None:
    dicomdirs = [data for name, data in CORPUS if name.endswith("DICOMDIR")]
    assert dicomdirs, "the Philips archive holds a DICOMDIR"
    for data in dicomdirs:
        with pytest.raises(NotDicom, match="study_instance_uid"):
            peek(io.BytesIO(data))


def _sample() -> Dataset:
    _, data = next((n, d) for n, d in CORPUS if "ge" in n)
    return pydicom.dcmread(io.BytesIO(data))


@pytest.mark.filterwarnings("ignore:The value length")  # a vendor's over-long SH, kept as it is
@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian])
def test_every_uncompressed_transfer_syntax_is_read(syntax: str, tmp_path: Path) -> None:
    ds = _sample()
    # a sequence of undefined length, with a nested one, before the UIDs (as ProcedureCodeSequence is)
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "X", "99", "inner"
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "MR", "99", "outer"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds.ProcedureCodeSequence = Sequence([item])
    ds.ProcedureCodeSequence.is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = syntax
    del ds.PixelData  # its bytes would need swapping for big endian; the UIDs come before it anyway
    path = tmp_path / "x.dcm"
    little, implicit = syntax != ExplicitVRBigEndian, syntax == ImplicitVRLittleEndian
    pydicom.dcmwrite(path, ds, little_endian=little, implicit_vr=implicit, force_encoding=True)
    assert peek(path) == _expected(path.read_bytes())


def test_a_file_without_the_dicm_prefix_or_a_uid_is_not_dicom(tmp_path: Path) -> None:
    with pytest.raises(NotDicom, match="DICM"):
        peek(io.BytesIO(b"\0" * 200))
    ds = _sample()
    del ds.StudyInstanceUID
    path = tmp_path / "no-study.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(NotDicom, match="study_instance_uid"):
        peek(path)


def test_every_truncation_of_a_real_header_is_not_dicom_or_still_complete() -> None:
    _, data = CORPUS[0]
    whole = peek(io.BytesIO(data))
    for cut in range(0, min(len(data), 6000), 7):
        try:
            assert peek(io.BytesIO(data[:cut])) == whole
        except NotDicom:
            pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=4000), st.integers(min_value=0, max_value=255)), max_size=8))
def test_mutated_headers_give_uids_or_not_dicom_and_nothing_else(mutations: list[tuple[int, int]]) -> None:
    _, data = CORPUS[0]
    mutated = bytearray(data[:8000])
    for at, value in mutations:
        mutated[at] = value
    try:
        ids = peek(io.BytesIO(bytes(mutated)))
    except NotDicom:
        return
    assert all(c.isdigit() or c == "." for c in ids.sop_instance_uid + ids.study_instance_uid)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_after_a_dicm_prefix_are_not_dicom(tail: bytes) -> None:
    with pytest.raises(NotDicom):
        peek(io.BytesIO(b"\0" * 128 + b"DICM" + tail))
