"""Converting candidate DICOM series with dcm2niix and choosing the diffusion series.

The vendor-specific diffusion tags (GE, Siemens CSA / mosaic / XA enhanced, Philips, Canon, UIH)
are **not** parsed here: ``dcm2niix`` (the field's reference converter, shipped as a wheel) turns
every candidate series into NIfTI + FSL ``.bval`` / ``.bvec`` + BIDS JSON, and we judge the series
by that output:

* each group that could be a DWI (at least :data:`MIN_DWI_FRAMES` images or frames) is converted
  separately, so each output is known to come from one group; derived outputs (``_ADC``,
  ``_TRACEW``, ``_FA``, phase ``_ph`` ...) are ignored;
* a group qualifies if an output has a b=0 volume (b < 50 s/mm^2) and diffusion directions that
  determine a tensor (design-matrix rank 6, i.e. at least 6 non-collinear directions); several
  qualifying series: the one with most volumes wins and a warning names the others.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import ConversionError, GradientError, NoDiffusionSeriesError
from core.ingest.dicom_series import SeriesGroup, describe_series
from core.ingest.gradients import B0_THRESHOLD, read_bvals, read_bvecs, tensor_rank

MIN_DWI_FRAMES = 7
"""A tensor needs one b=0 and six directions: a group with fewer images cannot be a DWI."""

DERIVED_SUFFIXES = ("_ADC", "_TRACEW", "_FA", "_ColFA", "_TENSOR", "_EXP", "_ph", "_real", "_imaginary", "_phMag")
"""dcm2niix name suffixes of derived or non-magnitude outputs, which are never the DWI."""


# ----------------------------------------------------------------------------------------------
# Conversion with dcm2niix
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvertedVolume:
    """One dcm2niix output (NIfTI + gradients + JSON sidecar) of one series group."""

    group: SeriesGroup
    nifti: Path
    bval: Path | None
    bvec: Path | None
    sidecar: Path | None

    @property
    def stem(self) -> str:
        return self.nifti.name.removesuffix(".gz").removesuffix(".nii")


def dcm2niix_binary() -> str:
    """Path of the dcm2niix executable: the PyPI wheel's, else one on PATH."""
    try:
        import dcm2niix  # the wheel ships the binary; imported lazily (optional at import time)

        path = Path(dcm2niix.bin)
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("dcm2niix")
    if found is None:
        raise ConversionError("the DICOM converter dcm2niix is not installed on this server")
    return found


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def convert_group(group: SeriesGroup, *, workdir: Path, timeout_s: float) -> list[ConvertedVolume]:
    """Run dcm2niix on one series group; return its outputs (derived images excluded).

    Raises :class:`ConversionError` if dcm2niix times out; a non-zero exit with no output
    returns an empty list (the caller decides whether that matters).
    """
    src = workdir / "in"
    out = workdir / "out"
    src.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(group.files):
        _link_or_copy(path, src / f"{i:06d}.dcm")
    # -ba y: the sidecar without patient name, ID, birth date, ... (core.ingest.sidecar then keeps
    # acquisition fields only: the anonymisation leaves the institution and device serial in)
    cmd = [dcm2niix_binary(), "-z", "y", "-b", "y", "-ba", "y", "-f", "%s_%d", "-o", str(out), str(src)]
    try:
        subprocess.run(cmd, capture_output=True, timeout=max(timeout_s, 1.0), check=False)
    except subprocess.TimeoutExpired as exc:
        raise ConversionError(
            f"converting the DICOM series '{group.description}' took longer than {timeout_s:.0f} s "
            "and was stopped"
        ) from exc
    outputs = []
    for nifti in sorted(out.glob("*.nii.gz")):
        stem = nifti.name[: -len(".nii.gz")]
        if stem.endswith(DERIVED_SUFFIXES):
            continue
        sidecar = out / f"{stem}.json"
        if sidecar.is_file() and _is_derived(sidecar):
            continue
        bval, bvec = out / f"{stem}.bval", out / f"{stem}.bvec"
        outputs.append(
            ConvertedVolume(
                group=group,
                nifti=nifti,
                bval=bval if bval.is_file() else None,
                bvec=bvec if bvec.is_file() else None,
                sidecar=sidecar if sidecar.is_file() else None,
            )
        )
    return outputs


def _is_derived(sidecar: Path) -> bool:
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return False
    image_type = meta.get("ImageType") or []
    return isinstance(image_type, list) and "DERIVED" in [str(t).upper() for t in image_type]


@dataclass(frozen=True)
class GradientSummary:
    """What a converted output's gradient table offers: volumes, b=0 count, tensor rank."""

    n_volumes: int
    n_b0: int
    rank: int

    @property
    def qualifies(self) -> bool:
        return self.n_b0 >= 1 and self.rank >= 6


def summarise_gradients(volume: ConvertedVolume) -> GradientSummary | None:
    """Read an output's ``.bval``/``.bvec``; None when it has no (readable, consistent) table."""
    if volume.bval is None or volume.bvec is None:
        return None
    try:
        bvals = read_bvals(volume.bval)
        bvecs = read_bvecs(volume.bvec)
    except GradientError:
        return None
    if bvecs.shape[0] != bvals.size:
        return None
    dw = bvals >= B0_THRESHOLD
    norms = np.linalg.norm(bvecs[dw], axis=1)
    vectors = bvecs[dw][norms > 0.5] / norms[norms > 0.5, None]
    return GradientSummary(n_volumes=int(bvals.size), n_b0=int((~dw).sum()), rank=tensor_rank(vectors))


# ----------------------------------------------------------------------------------------------
# Choosing the diffusion series
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    volume: ConvertedVolume
    gradients: GradientSummary


def _reason(summary: GradientSummary | None) -> str | None:
    if summary is None:
        return None
    if summary.n_b0 == 0:
        return f"{summary.n_volumes} volumes without a b=0 image"
    return f"{summary.n_volumes} volumes with too few diffusion directions for a tensor"


def choose_series(
    groups: Sequence[SeriesGroup], *, workdir: Path, timeout_s: float
) -> tuple[ConvertedVolume, tuple[str, ...]]:
    """Convert the candidate groups and choose the diffusion series.

    Returns the chosen output and warning sentences (empty unless several series qualified).
    Raises :class:`NoDiffusionSeriesError` naming every series found when none qualifies, and
    :class:`ConversionError` when dcm2niix produced nothing for a group that could be a DWI.
    """
    deadline = time.monotonic() + timeout_s
    candidates: list[_Candidate] = []
    notes: dict[str, str] = {}
    failed: list[SeriesGroup] = []
    for index, group in enumerate(groups):
        if group.n_frames < MIN_DWI_FRAMES:
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ConversionError(f"converting the upload took longer than {timeout_s:.0f} s and was stopped")
        outputs = convert_group(group, workdir=workdir / f"series{index:03d}", timeout_s=remaining)
        if not outputs:
            failed.append(group)
        for volume in outputs:
            summary = summarise_gradients(volume)
            if summary is not None and summary.qualifies:
                candidates.append(_Candidate(volume, summary))
            elif (reason := _reason(summary)) is not None:
                notes[group.series_instance_uid + "|" + group.sop_class_uid] = reason
    if not candidates:
        if failed and not notes:
            names = ", ".join(f"'{g.description}'" for g in failed)
            raise ConversionError(f"the DICOM converter could not read the series {names}")
        raise NoDiffusionSeriesError(
            f"the upload holds {describe_series(groups, notes)} but none is a diffusion series with "
            "a b=0 image and at least 6 diffusion directions"
        )
    candidates.sort(key=lambda c: (-c.gradients.n_volumes, c.volume.group.series_number or 0))
    chosen = candidates[0]
    return chosen.volume, _choice_warning(chosen, candidates[1:])


def _choice_warning(chosen: _Candidate, others: Sequence[_Candidate]) -> tuple[str, ...]:
    if not others:
        return ()

    def name(c: _Candidate) -> str:
        number = c.volume.group.series_number
        where = f"series {number}, " if number is not None else ""
        return f"'{c.volume.group.description}' ({where}{c.gradients.n_volumes} volumes)"

    rest = "; ".join(name(c) for c in others)
    why = "the one with most volumes" if chosen.gradients.n_volumes > others[0].gradients.n_volumes else (
        "the first of those with most volumes"
    )
    return (f"the upload holds {len(others) + 1} diffusion series: analysed {name(chosen)}, {why}, and ignored {rest}",)
