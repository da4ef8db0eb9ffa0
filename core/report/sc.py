"""Writing the QC picture as a DICOM Secondary Capture Image in the source study.

A PACS shows a PNG nowhere; a Secondary Capture (SC) Image Storage object carrying the same
RGB pixels sits in the study next to the diffusion series and its SEG, so a radiologist sees
which voxels were measured without leaving the viewer. Patient and study attributes come from
a source image of the analysed series through :func:`core.report.dicom_source.source_header`
(empty type-2 values when the source is de-identified).

The picture is a montage of axial panels in radiological view (anterior up, the patient's
left on the right of each panel), so its Patient Orientation is ``L\\P``: rows run towards the
patient's left, columns towards posterior. It has no pixel spacing (the panels are enlarged for
display) and no frame of reference: an SC image is not placed in the patient's space.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset

from core.errors import UnsupportedInputError
from core.ingest.dicom import DicomSeriesInfo
from core.report.dicom_source import (
    SC_SERIES_NUMBER_OFFSET,
    new_series,
    source_header,
)

QC_PATIENT_ORIENTATION = ("L", "P")
"""Row and column directions of every QC panel (radiological view, anterior up)."""

WORKSTATION = "WSD"
"""Conversion Type (0008,0064) of an image made on a workstation (PS3.3 C.8.6.1)."""

BODY_PART = "CSPINE"
"""Body Part Examined (PS3.16 Annex L, cervical spine): an unpaired part, so Laterality (type 2C,
required for paired parts only) is rightly absent; validators such as dciodvfy ask for
Laterality when the body part is not named."""


def read_rgb_png(png_path: Path) -> NDArray[np.uint8]:
    """The pixels of a PNG as RGB: (rows, columns, 3) uint8.

    An alpha channel is dropped (the QC picture is opaque); palette and grey PNGs are expanded
    to RGB.
    """
    with Image.open(Path(png_path)) as image:
        return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def reference_header(series: DicomSeriesInfo) -> Dataset:
    """The header of one source image of ``series`` (its first b=0 image, else its first file),
    completed for derivation. Raises :class:`UnsupportedInputError` when there is none."""
    if series.b0_sources:
        return source_header(series.b0_sources[0].path)
    if series.files:
        return source_header(series.files[0])
    raise UnsupportedInputError(
        "the diffusion series has no source image, so the QC picture cannot be attached to its study"
    )


def qc_sc_image(
    pixels: NDArray[np.uint8], *, ref: Dataset, series: DicomSeriesInfo, software_version: str
) -> hd.sc.SCImage:
    """Build the Secondary Capture of the RGB ``pixels`` (rows, columns, 3) in ``ref``'s study.

    Raises :class:`UnsupportedInputError` when ``ref`` holds patient/study values highdicom
    refuses (e.g. a Patient's Sex other than M, F or O).
    """
    try:
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            patient_orientation=QC_PATIENT_ORIENTATION,
            **new_series(series, offset=SC_SERIES_NUMBER_OFFSET, kind="QC", software_version=software_version),
            transfer_syntax_uid=hd.UID("1.2.840.10008.1.2.1"),  # Explicit VR Little Endian
        )
    except ValueError as exc:
        raise UnsupportedInputError(
            f"the source images carry a patient or study value that is not valid DICOM ({exc}), "
            "so the QC picture cannot be attached to their study"
        ) from exc
    # highdicom says DI (digitised interface); the picture is rendered by software, a workstation.
    image.ConversionType = WORKSTATION
    image.BodyPartExamined = BODY_PART
    return image


def write_qc_sc(png_path: Path, *, series: DicomSeriesInfo, out_path: Path, software_version: str) -> str:
    """Write the QC picture as a Secondary Capture Image in the source study.

    Parameters
    ----------
    png_path : the QC picture, an RGB or RGBA PNG (``qc.png`` from
        :func:`core.report.qc.write_qc_png`); alpha is dropped.
    series : the analysed series (``DicomIngest.series``); one of its source files must still
        exist, for the patient and study attributes.
    out_path : where to write the SC (``.dcm``).
    software_version : scsnet / model version, recorded as Software Versions.

    Returns
    -------
    The new series' SeriesInstanceUID (its series number is the source's + 1002).

    Raises
    ------
    UnsupportedInputError : the source cannot provide a study to attach the picture to (no
        source image, no Study Instance UID, invalid patient/study values); one sentence.
    """
    image = qc_sc_image(
        read_rgb_png(png_path), ref=reference_header(series), series=series, software_version=software_version
    )
    image.save_as(Path(out_path), enforce_file_format=True)
    return str(image.SeriesInstanceUID)
