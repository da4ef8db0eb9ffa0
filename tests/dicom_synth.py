"""Write a NIfTI DWI as a classic DICOM MR series (one file per slice and volume) with the
standard diffusion attributes (0018,9087) b-value and (0018,9089) gradient direction in the
patient (LPS) frame, so that a real cervical study can go through the DICOM path."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

LPS = np.diag([-1.0, -1.0, 1.0])


def write_dicom_series(
    image: Path, bvals: np.ndarray, bvecs_world: np.ndarray, out_dir: Path, *, series_description: str = "DTI cervical",
    manufacturer: str = "SCSNET-TEST", float_pixels: bool = False, attributes: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write every slice of every volume of ``image`` as one DICOM file into ``out_dir``.

    bvals : (N,) s/mm^2; bvecs_world : (N, 3) unit directions in world RAS+.
    Returns the written paths. Pixel values are the image rounded to uint16 after scaling to
    0..4000 (RescaleSlope carries the scale back); with ``float_pixels`` they are the image's
    own values as 32-bit floats in Float Pixel Data (7FE0,0008), as some exports write them.
    ``attributes`` (keyword -> value) are set on every file last, e.g. patient identifiers.
    """
    img = nib.load(str(image))
    data = np.asarray(img.dataobj, dtype=np.float64)
    affine = img.affine
    nx, ny, nz, nv = data.shape
    slope = max(float(data.max()) / 4000.0, 1e-6)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    # DICOM pixel (row r, column c) -> voxel (i=c, j=r): columns run along array axis 0.
    col_dir = LPS @ affine[:3, 0] / np.linalg.norm(affine[:3, 0])
    row_dir = LPS @ affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for v in range(nv):
        for k in range(nz):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = MRImageStorage
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SOPClassUID = MRImageStorage
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
            ds.Modality = "MR"
            ds.Manufacturer = manufacturer
            ds.PatientName = "Anonymous^Test"
            ds.PatientID = "TEST0001"
            ds.PatientBirthDate = ""
            ds.PatientSex = "O"
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
            ds.AccessionNumber = ""
            ds.ReferringPhysicianName = ""
            ds.StudyID = "1"
            ds.SeriesNumber = 5
            ds.InstanceNumber = v * nz + k + 1
            ds.AcquisitionNumber = v + 1
            ds.SeriesDescription = series_description
            ds.ProtocolName = series_description
            ds.ScanningSequence = "EP"
            ds.SequenceVariant = "SK"
            ds.MRAcquisitionType = "2D"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]
            ds.PatientPosition = "HFS"
            ds.ImageOrientationPatient = [float(x) for x in (*col_dir, *row_dir)]  # row direction first: along columns index
            pos = LPS @ (affine @ np.array([0, 0, k, 1.0]))[:3]
            ds.ImagePositionPatient = [float(x) for x in pos]
            ds.SliceThickness = float(zooms[2])
            ds.SpacingBetweenSlices = float(zooms[2])
            ds.PixelSpacing = [float(zooms[1]), float(zooms[0])]  # row spacing, column spacing
            ds.EchoTime = 80.0
            ds.RepetitionTime = 4000.0
            ds.MagneticFieldStrength = 3.0
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = ny, nx
            if float_pixels:
                ds.BitsAllocated = 32
                ds.FloatPixelData = np.ascontiguousarray(data[:, :, k, v].astype(np.float32).T).tobytes()
            else:
                ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
                ds.RescaleIntercept, ds.RescaleSlope = 0.0, slope
                pixels = np.clip(np.round(data[:, :, k, v] / slope), 0, 65535).astype(np.uint16).T  # (rows=j, cols=i)
                ds.PixelData = np.ascontiguousarray(pixels).tobytes()
            ds.DiffusionBValue = float(bvals[v])
            if bvals[v] >= 50:
                ds.DiffusionDirectionality = "DIRECTIONAL"
                item = pydicom.Dataset()
                item.DiffusionGradientOrientation = [float(x) for x in LPS @ bvecs_world[v]]
                ds.DiffusionGradientDirectionSequence = [item]
            else:
                ds.DiffusionDirectionality = "NONE"
            for keyword, value in (attributes or {}).items():
                setattr(ds, keyword, value)
            path = out_dir / f"IM{v:03d}_{k:03d}"
            ds.save_as(str(path), enforce_file_format=True)
            paths.append(path)
    return paths
