"""Assembling ``report.json`` and checking it against its published JSON Schema."""

from __future__ import annotations

import datetime as dt
import json
from functools import lru_cache
from importlib import metadata
from importlib.resources import files
from typing import TYPE_CHECKING, Any

import jsonschema
import numpy as np

import core
from core.ingest.dwi import DWI

if TYPE_CHECKING:
    from core.ingest.dicom import DicomSeriesInfo
    from core.segment.runtime import Segmenter

SCHEMA_VERSION = "2.5"
"""2.0: the refinement by MD is reported in ``refinement`` (was ``qc.csf_rim``), timed as the
``refine`` stage. 2.1 (optional keys, a 2.0 reader is unaffected): ``estimator``,
``confidence_method`` and ``anatomy``; per region and per slice-region ``fa_weighted``,
``md_weighted``, ``confidence``, ``top_probability``, ``augmentation_dice``; the ``whole``
stage in ``timings_s``. 2.2 and 2.3: the refinement's ``first_pass_slices`` and
``md_threshold_by_slice_mm2_s``. 2.4: its ``fa_fraction_of_white_matter`` and
``fa_threshold_by_slice`` (the trim by FA). 2.5: ``qc.cord_turn_deg`` (the cord's in-plane
angle the network's crops were also seen turned back by)."""

UNITS = {
    "fa": "1 (dimensionless)",
    "md": "mm^2/s",
    "ad": "mm^2/s",
    "rd": "mm^2/s",
    "volume_mm3": "mm^3",
    "cord_area_mm2": "mm^2",
    "z_mm": "mm (world RAS+, superior positive)",
    "b_values": "s/mm^2",
    "b0_snr": "1 (dimensionless)",
    "timings_s": "s",
}


@lru_cache(maxsize=1)
def report_schema() -> dict[str, Any]:
    """The report's JSON Schema (draft 2020-12), shipped as ``core/report/report.schema.json``."""
    return json.loads(files("core.report").joinpath("report.schema.json").read_text())


@lru_cache(maxsize=1)
def _report_validator() -> jsonschema.protocols.Validator:
    """A validator for the report schema, built once (``jsonschema.validate`` re-checks the
    schema itself on every call, which costs more than validating a report)."""
    cls = jsonschema.validators.validator_for(report_schema())
    cls.check_schema(report_schema())
    return cls(report_schema(), format_checker=jsonschema.FormatChecker())


def validate_report(report: dict[str, Any]) -> None:
    """Raise :class:`jsonschema.ValidationError` if ``report`` breaks the published schema."""
    error = jsonschema.exceptions.best_match(_report_validator().iter_errors(report))
    if error is not None:
        raise error


def software_versions() -> dict[str, str]:
    """Versions of scsnet and the libraries that shape its numbers."""
    out = {"scsnet": core.__version__}
    for dist in ("dipy", "onnxruntime", "nibabel", "numpy", "scipy", "pydicom", "highdicom", "dcm2niix"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def input_section(dwi: DWI, series: DicomSeriesInfo | None = None) -> dict[str, Any]:
    """The ``input`` section: what was read, in the orientation it was stored; for DICOM input
    (``series``) also the study it belongs to, so results can be filed against the order."""
    prov = dwi.provenance
    return {
        "format": prov.format,
        "files": [{"name": f.name, "sha256": f.sha256} for f in prov.files],
        "series_description": prov.series_description,
        "series_instance_uid": prov.series_instance_uid,
        "study_instance_uid": (series.study_instance_uid or None) if series is not None else None,
        "accession_number": series.accession_number if series is not None else None,
        "manufacturer": prov.manufacturer,
        "shape": [int(s) for s in dwi.data.shape],
        "voxel_size_mm": [round(z, 6) for z in dwi.zooms],
        "orientation": dwi.orientation_codes(),
    }


def acquisition_section(dwi: DWI) -> dict[str, Any]:
    """The ``acquisition`` section: b-values (s/mm^2) and counts."""
    shells = np.unique(np.round(dwi.bvals[~dwi.is_b0], -1))
    return {
        "b_values": [0.0] + [float(b) for b in shells],
        "n_volumes": int(dwi.data.shape[3]),
        "n_b0": int(dwi.is_b0.sum()),
        "n_directions": int(dwi.n_directions),
    }


def now_iso() -> str:
    """The time now, UTC, ISO 8601 to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def model_section(segmenter: Segmenter) -> dict[str, Any]:
    """The ``model`` section: which network segmented, on which ONNX Runtime provider."""
    return {
        "name": segmenter.manifest.name,
        "version": segmenter.manifest.version,
        "sha256": segmenter.sha256,
        "provider": segmenter.provider,
    }


def fit_section(*, method: str, full_maps: bool, margin_mm: float, voxels: int) -> dict[str, Any]:
    """The ``fit`` section: how and where the tensor was fitted."""
    return {
        "method": method,
        "region": "full-field" if full_maps else "cord-margin",
        "margin_mm": None if full_maps else margin_mm,
        "voxels": voxels,
    }


def assemble(
    dwi: DWI,
    *,
    series: DicomSeriesInfo | None,
    measures: dict[str, Any],
    refinement: dict[str, Any],
    model: dict[str, Any],
    fit: dict[str, Any],
    timings_s: dict[str, float],
) -> dict[str, Any]:
    """The whole report of a study as read (``dwi``, its own orientation; ``series``: the
    DICOM series it came from), from its sections. ``measures`` holds ``regions``, ``cord``,
    ``slices``, ``most_compressed_slice`` and ``qc`` (and, from 2.1, ``estimator``,
    ``confidence_method`` and ``anatomy``); ``dicom_outputs`` is filled in once the
    DICOM objects are written.
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "created": now_iso(),
        "input": input_section(dwi, series),
        "acquisition": acquisition_section(dwi),
        "units": UNITS,
        **measures,
        "dicom_outputs": {},
        "refinement": refinement,
        "model": model,
        "software": software_versions(),
        "fit": fit,
        "timings_s": dict(timings_s),
    }
