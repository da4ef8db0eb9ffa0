"""What every DICOM output takes from the source series, in one place: the source headers made
fit for highdicom, the series numbers and descriptions of the outputs, and who made them.

Hospitals often send de-identified DICOM: Patient's Name, ID, Birth Date and Sex, Study ID,
Accession Number, Referring Physician and Study Date/Time may be missing, although the
standard makes them type 2 (present, possibly empty). highdicom copies them from the source
image and fails on a missing one, so :func:`source_header` gives the in-memory header an empty
value for each missing one; the derived objects then carry empty type-2 values where the source
had none. A date or time no library can parse (UIH writes "***") is emptied the same way. The
files themselves are never modified.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import highdicom as hd
import pydicom
from pydicom import valuerep
from pydicom.dataset import Dataset

from core.errors import UnsupportedInputError

if TYPE_CHECKING:
    from core.ingest.dicom import DicomSeriesInfo

TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDate",
    "StudyTime",
)
"""Type-2 attributes of the Patient and General Study modules highdicom copies to a derived object."""

MANUFACTURER = "scsnet"
ALGORITHM_NAME = "SCS-Net"

ANATOMICAL_STRUCTURE = hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure")
SPINAL_CORD = hd.sr.CodedConcept("2748008", "SCT", "Spinal cord")
CORD_SEGMENT_NUMBER = 9
"""The SEG's segment of the whole spinal cord (the union of the regions 1-8), which the
measurement report's whole-cord group references; the regions keep their label codes."""
CORD_TRACKING_ID = "spinal_cord"

SEG_SERIES_NUMBER_OFFSET = 1000
SR_SERIES_NUMBER_OFFSET = 1001
SC_SERIES_NUMBER_OFFSET = 1002
"""Each output's series number is the source's plus its offset, so it sorts next to it in a PACS."""


def complete_for_derivation(ds: Dataset) -> Dataset:
    """Give ``ds`` (in memory) an empty value for each missing type-2 Patient/Study attribute;
    returns ``ds``. Raises :class:`UnsupportedInputError` when the type-1 identifiers a derived
    object must carry (Study Instance UID, SOP Class and Instance UIDs) are missing."""
    for keyword in ("StudyInstanceUID", "SOPClassUID", "SOPInstanceUID"):
        if not str(ds.get(keyword, "") or ""):
            raise UnsupportedInputError(
                f"the source images have no {keyword}, so no DICOM result can be attached to their study"
            )
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in ds or ds[keyword].value is None or not _valid(ds, keyword):
            setattr(ds, keyword, "")
    return ds


def _valid(ds: Dataset, keyword: str) -> bool:
    """Whether a date or time value parses (UIH writes "***" for a withheld date, which no DICOM
    library can copy); other values count as valid."""
    element = ds[keyword]
    if element.VR not in ("DA", "TM") or not element.value:
        return True
    raw = str(element.value)
    try:
        (valuerep.DA if element.VR == "DA" else valuerep.TM)(raw)
    except ValueError:
        return False
    return True


def source_header(path: Path) -> Dataset:
    """The header (no pixel data) of the source image at ``path``, completed for derivation."""
    return complete_for_derivation(pydicom.dcmread(Path(path), stop_before_pixels=True, force=True))


def new_series(series: DicomSeriesInfo, *, offset: int, kind: str, software_version: str) -> dict[str, Any]:
    """The attributes of a new derived object in a new series of the source study, as
    highdicom's constructors take them: fresh Series and SOP Instance UIDs, the series number
    (the source's plus ``offset``), a description naming ``kind``, and who made it."""
    return {
        "series_instance_uid": hd.UID(),
        "series_number": (series.series_number or 0) + offset,
        "sop_instance_uid": hd.UID(),
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": ALGORITHM_NAME,
        "software_versions": software_version,
        "series_description": series_description(kind, series.series_description),
    }


def software_versions(software_version: str, model: dict[str, Any]) -> str:
    """Software Versions of a derived object: scsnet's and the model's, e.g.
    ``"0.2.0 (model scsnet 0.5.0)"`` (``model``: report.json's ``model`` section)."""
    if not model.get("name"):
        return software_version
    return f"{software_version} (model {model['name']} {model.get('version', '')})".replace(" )", ")")[:64]


def series_description(kind: str, source_description: str) -> str:
    """A series description a radiographer recognises: ``"<kind> (SCS-Net) <source>"``,
    within the 64 characters a LO value may hold."""
    return f"{kind} (SCS-Net) {source_description}".strip()[:64]
