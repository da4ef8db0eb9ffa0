"""Every DICOM diffusion series under tests/data, and the real cervical DWI written as DICOM,
each as exported and de-identified three ways, through ``scsnet analyze``: the cervical DWI
exits 0 with every DICOM output the series allows; the others, all brain scans (most with
zeroed pixels), exit 2 with one line saying why (no spinal cord, or no usable gradients);
never exit 1.

De-identification variants, as hospitals export studies:
- ``identifiers-deleted``: the Patient and Study identifiers deleted outright (Patient's Name,
  ID, Birth Date, Sex, Study ID, Accession Number, Referring Physician, Study Date and Time);
- ``private-removed``: every private tag removed (vendors keep diffusion gradients there, so
  GE, Siemens mosaic and UIH studies then have none: exit 2 is right for them);
- ``dicognito``: the PS3.15-style anonymisation of ``dicognito`` (new names, IDs, UIDs, dates).

The de-identified copies of the Canon classic and Philips series keep every 4th slice of each
volume (:data:`THINNED`): the same layouts in a quarter of the files.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from dicognito.anonymizer import Anonymizer
from dicom_synth import write_dicom_series
from dicom_validate import dciodvfy

from cli.main import main
from core.ingest.dicom import ingest_dicom
from core.ingest.dicom_geometry import PlaneGeometry, frame_planes
from core.ingest.nifti import load_nifti_dwi
from core.labels import REGIONS
from core.report.qc import write_qc_png
from core.report.write import write_dicom_outputs

DATA = Path(__file__).parent / "data" / "dicom"
SERIES = {
    "ge": ("dcm_qa_ge", "In"),
    "canon-classic": ("dcm_qa_canon_61", "In/cl"),
    "canon-enhanced": ("dcm_qa_canon_61", "In/enh"),
    "siemens-hfp-mosaic": ("dcm_qa_decubitus", "In/HFP"),
    "siemens-hfs-mosaic": ("dcm_qa_decubitus", "In/HFS"),
    "philips": ("dcm_qa_philips_dwi", "In"),
    "siemens-sagittal-mosaic": ("dcm_qa_sag", "In"),
    "uih": ("dcm_qa_uih", "In"),
    "siemens-xa30": ("dcm_qa_xa30", "In"),
}
MOSAIC = {"siemens-hfp-mosaic", "siemens-hfs-mosaic", "siemens-sagittal-mosaic", "uih"}
IDENTIFIERS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber",
    "ReferringPhysicianName", "StudyDate", "StudyTime",
)  # fmt: skip
VARIANTS = ("as-exported", "identifiers-deleted", "private-removed", "dicognito")
THINNED = {"canon-classic", "philips"}
"""The classic series of hundreds of files (520 and 549): their de-identified copies keep every
:data:`KEEP_EVERY`-th slice of every volume, the same layout in a quarter of the files (copying,
de-identifying and reading these files was most of this module's time)."""
KEEP_EVERY = 4
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, real_dwi_paths: dict[str, Path]) -> dict[str, Path]:
    """Each series' folder, unpacked once; and the real cervical DWI as classic DICOM."""
    root = tmp_path_factory.mktemp("corpus")
    for archive in {a for a, _ in SERIES.values()}:
        with tarfile.open(DATA / f"{archive}.tar.xz") as tar:
            tar.extractall(root, filter="data")
    folders = {name: root / archive / sub for name, (archive, sub) in SERIES.items()}
    dwi = load_nifti_dwi(real_dwi_paths["image"], bval=real_dwi_paths["bval"], bvec=real_dwi_paths["bvec"])
    folders["cervical-dwi"] = root / "cervical" / "series5"
    write_dicom_series(real_dwi_paths["image"], dwi.bvals, dwi.bvecs, folders["cervical-dwi"])
    return folders


@pytest.fixture(scope="module")
def exports(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """``exports(series, variant)``: the series' folder as exported, or its de-identified copy,
    made once for the module (both tests below read the same copies; dicognito alone takes
    tens of seconds on the Philips series' 549 files). The copies are read, never written."""
    made: dict[tuple[str, str], Path] = {}
    root = tmp_path_factory.mktemp("exports")

    def get(series: str, variant: str) -> Path:
        if variant == "as-exported":
            return sources[series]
        if (series, variant) not in made:
            keep_every = KEEP_EVERY if series in THINNED else 1
            made[series, variant] = _variant(sources[series], variant, root / series / variant, keep_every=keep_every)
        return made[series, variant]

    return get


def _float_series(dest: Path) -> Path:
    """The real cervical DWI as classic DICOM with 32-bit float pixels."""
    real = Path(__file__).parent / "data" / "sct_tutorial_dmri"
    dwi = load_nifti_dwi(real / "dmri.nii.gz", bval=real / "bvals.txt", bvec=real / "bvecs.txt")
    write_dicom_series(real / "dmri.nii.gz", dwi.bvals, dwi.bvecs, dest, float_pixels=True)
    return dest


def _height_mm(plane: PlaneGeometry) -> float:
    """Where an image or frame lies along its slice normal (mm)."""
    o = plane.orientation
    return float(np.dot(np.cross(o[:3], o[3:]), plane.position))


def _every_kth_slice(heights: Sequence[float], k: int) -> list[bool]:
    """Which of the images at ``heights`` (mm) to keep: those at every ``k``-th distinct height."""
    kept = set(sorted({round(h, 2) for h in heights})[::k])
    return [round(h, 2) in kept for h in heights]


def _variant(source: Path, variant: str, dest: Path, *, keep_every: int = 1) -> Path:
    """A copy of the DICOM files under ``source`` (non-DICOM files left out), de-identified;
    with ``keep_every`` k > 1, only the images of every k-th slice (classic images)."""
    anonymizer = Anonymizer(seed="scsnet-corpus")  # one per study: consistent new UIDs across its files
    images = []
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception:  # noqa: BLE001 - not DICOM (DICOMDIR parts, text): left out
            continue
        if "SOPInstanceUID" in ds:
            images.append(ds)
    if keep_every > 1:  # objects that are not slices (no plane) are all kept
        planes = [(ds, frame_planes(ds)[0]) for ds in images]
        slices = [(ds, plane) for ds, plane in planes if plane is not None]
        heights = [_height_mm(plane) for _, plane in slices]
        dropped = {id(ds) for (ds, _), keep in zip(slices, _every_kth_slice(heights, keep_every), strict=True) if not keep}
        images = [ds for ds in images if id(ds) not in dropped]
    for n, ds in enumerate(images):
        if variant == "identifiers-deleted":
            for keyword in IDENTIFIERS:
                if keyword in ds:
                    delattr(ds, keyword)
        elif variant == "private-removed":
            ds.remove_private_tags()
        elif variant == "dicognito":
            _blank_unparseable_dates(ds)  # dicognito itself fails on UIH's "***" dates
            anonymizer.anonymize(ds)
        dest.mkdir(parents=True, exist_ok=True)
        ds.save_as(dest / f"{n:05d}.dcm", enforce_file_format=False)
    return dest


def _blank_unparseable_dates(ds: pydicom.Dataset) -> None:
    """Empty every date/time holding anything but digits and separators (UIH's "***")."""
    for element in ds:
        if element.VR in ("DA", "TM", "DT") and element.value and str(element.value).strip("0123456789.+-: "):
            element.value = ""


def _one_frame_per_file(source: Path, dest: Path) -> Path:
    """The enhanced multi-frame files under ``source`` split into Enhanced MR objects of one
    frame each (as some archives store them): each keeps its frame's functional groups. Only
    every :data:`KEEP_EVERY`-th slice is kept (the XA30 series' 819 frames are 21 volumes of
    39 slices)."""
    dest.mkdir(parents=True)
    n = 0
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(path)
        frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
        items = ds.PerFrameFunctionalGroupsSequence
        heights = [_height_mm(plane) for plane in frame_planes(ds) if plane is not None]
        for f, (item, keep) in enumerate(zip(items, _every_kth_slice(heights, KEEP_EVERY), strict=True)):
            if not keep:
                continue
            one = ds.copy()
            one.NumberOfFrames = 1
            one.PerFrameFunctionalGroupsSequence = [item]
            one.PixelData = frames[f].tobytes()
            one.SOPInstanceUID = one.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            one.InstanceNumber = n + 1
            one.save_as(dest / f"{n:05d}.dcm", enforce_file_format=True)
            n += 1
    return dest


@pytest.mark.parametrize(
    ("make", "brain"),
    [
        pytest.param(lambda sources, dest: _one_frame_per_file(sources["siemens-xa30"], dest), True, id="enhanced-one-frame-per-file"),
        pytest.param(lambda sources, dest: _float_series(dest), False, id="float32-pixels"),
    ],
)
def test_unusual_encodings_get_every_dicom_output(
    sources: dict[str, Path], make: Callable[[dict[str, Path], Path], Path], brain: bool, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], real_dwi_paths: dict[str, Path],
) -> None:
    """Enhanced MR objects of one frame each (highdicom takes a single multi-frame source) and
    32-bit float pixels (Float Pixel Data, which pydicom decodes): SEG, SR and QC all written.

    The enhanced objects are the XA30 brain series (zeroed pixels): analysis refuses it for want
    of a spinal cord, so what the SEG needs (every slice's b=0 source, over many files) is
    checked on the ingest instead."""
    study = make(sources, tmp_path / "in")
    code = main(["analyze", str(study), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr()
    if brain:
        assert code == 2, printed.err
        assert "no spinal cord" in printed.err and len(printed.err.strip().splitlines()) == 1, printed.err
        ingest = ingest_dicom([study], workdir=tmp_path / "ingest")
        assert ingest.series.seg_supported, ingest.series.seg_unsupported_reason
        assert len({s.path for s in ingest.series.b0_sources}) > 1
        return
    assert code == 0, printed.err
    for name in ("seg.dcm", "sr.dcm", "qc.dcm"):
        assert (tmp_path / "out" / name).is_file(), (name, printed.out)
        assert not dciodvfy(tmp_path / "out" / name), name
    seg = pydicom.dcmread(tmp_path / "out" / "seg.dcm", stop_before_pixels=True)
    referenced = {i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert len(referenced) > 1  # every b=0 source file, not only the one highdicom was given


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("series", [*SERIES, "cervical-dwi"])
def test_every_export_is_analysed_or_refused_in_one_line(
    exports: Callable[[str, str], Path], series: str, variant: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    record_property: Callable[[str, object], None],
) -> None:
    study = exports(series, variant)
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["analyze", str(study), "--out", str(out)])
    printed = capsys.readouterr()
    err = printed.err.strip()
    record_property("exit_status", code)  # counted by series and variant with --junitxml
    assert code in (0, 2), f"{series}/{variant}: exit {code}: {err}"
    assert code == (0 if series == "cervical-dwi" else 2), f"{series}/{variant}: exit {code}: {err}"  # the others are brains
    if code == 2:
        assert len(err.splitlines()) == 1 and err.startswith("scsnet: error: "), err
        assert not out.exists()
        # the only right reasons to refuse these studies: a brain, or no usable gradients
        assert "no spinal cord" in err or "gradient" in err or "diffusion" in err, err
        return
    written = {p.name for p in out.iterdir()}
    if series in MOSAIC:
        assert {"qc.dcm"} <= written and "seg.dcm" not in written and "sr.dcm" not in written, written
    else:
        assert {"seg.dcm", "sr.dcm", "qc.dcm"} <= written, (written, err)
        for name in ("seg.dcm", "sr.dcm", "qc.dcm"):
            ds = pydicom.dcmread(out / name, stop_before_pixels=True)
            for keyword in IDENTIFIERS[:4]:  # type 2 in every IOD: present, empty where the source had none
                assert keyword in ds, (name, keyword)
            errors = dciodvfy(out / name)
            assert not errors, (series, variant, name, errors)
    if series == "cervical-dwi":
        assert printed.out.startswith("cord FA "), printed.out


def _report_for(labels: np.ndarray, zooms: tuple[float, ...]) -> dict[str, Any]:
    """The report sections the DICOM writers read, for ``labels`` (made-up tensor values)."""
    voxel = float(np.prod(zooms[:3]))

    def measured(mask: np.ndarray, fa: float) -> dict[str, Any]:
        stats = {"fa": fa, "md": 0.8e-3, "ad": 1.5e-3, "rd": 0.45e-3}
        return {key: {"mean": value if mask.any() else None} for key, value in stats.items()} | {
            "voxels": int(mask.sum()), "volume_mm3": round(int(mask.sum()) * voxel, 3),
        }

    regions = [{"code": r.code, "name": r.name} | measured(labels == r.code, 0.5 + r.code / 100) for r in REGIONS]
    return {"regions": regions, "cord": measured(labels > 0, 0.6), "model": {"name": "scsnet", "version": "test"},
            "dicom_outputs": {}}  # fmt: skip


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "private-removed"])
@pytest.mark.parametrize("series", [s for s in SERIES if s not in MOSAIC])
def test_every_vendor_layout_gets_seg_sr_and_qc_that_pass_dciodvfy(
    exports: Callable[[str, str], Path], series: str, variant: str, tmp_path: Path
) -> None:
    """The shared vendor series are brain scans, which the analysis refuses (no spinal cord), so
    their DICOM layouts (classic, enhanced one file, one file per volume; GE, Canon, Philips,
    Siemens) are given to the DICOM writers directly, with a made-up region map, as exported
    and de-identified: SEG, SR and QC written, no warning, no dciodvfy error.

    Not with the private tags removed: the writers copy no private attribute, so such a copy
    gives them what the export gives them (the analysis of it is tested above)."""
    study = exports(series, variant)
    ingest = ingest_dicom([study], workdir=tmp_path / "work")
    labels = np.zeros(ingest.dwi.shape[:3], dtype=np.uint8)
    x, y, z = (n // 2 for n in labels.shape)
    for code in range(1, 9):
        labels[x - 4 + code, y - 2 : y + 2, z] = code
    out = tmp_path / "out"
    out.mkdir()
    write_qc_png(ingest.dwi.mean_b0(), ingest.dwi.mean_b0() * 0, labels, out / "qc.png", zooms_mm=ingest.dwi.zooms)
    report = _report_for(labels, ingest.dwi.zooms)
    warnings = write_dicom_outputs(
        labels, affine=ingest.dwi.affine, series=ingest.series, report=report, out=out, software_version="test"
    )
    assert warnings == []
    assert set(report["dicom_outputs"]) == {"seg", "sr", "qc"}
    for name in ("seg.dcm", "sr.dcm", "qc.dcm"):
        ds = pydicom.dcmread(out / name, stop_before_pixels=True)
        assert ds.StudyInstanceUID == ingest.series.study_instance_uid
        for keyword in IDENTIFIERS[:4]:
            assert keyword in ds, (name, keyword)
        assert not dciodvfy(out / name), (series, variant, name)
