"""Diffusion tensor fitting with DIPY, restricted to the voxels that matter.

The model is planned once per gradient table (DIPY's ``TensorModel(gtab)``) and fitted on a
mask: the segmented cord dilated by a margin, so that a whole-field fit (the slow part of a
naive pipeline) is avoided. Units: b in s/mm^2, so diffusivities come out in mm^2/s.

Reference: Basser, Mattiello & Le Bihan, J Magn Reson B 1994; weighted least squares as in
Chung et al., NeuroImage 2006 (DIPY ``fit_method="WLS"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel
from numpy.typing import NDArray
from scipy import ndimage

from core.ingest.dwi import DWI
from core.ingest.gradients import B0_THRESHOLD, rotation_of

FitMethod = Literal["WLS", "OLS", "NLLS"]


@dataclass(frozen=True)
class TensorMaps:
    """Scalar maps of a tensor fit on one voxel grid; zero outside ``mask``.

    Attributes
    ----------
    fa : (X, Y, Z) float32 fractional anisotropy, dimensionless in [0, 1].
    md : (X, Y, Z) float32 mean diffusivity trace(D)/3 (the DTI "ADC"), mm^2/s.
    ad : (X, Y, Z) float32 axial diffusivity lambda1, mm^2/s.
    rd : (X, Y, Z) float32 radial diffusivity (lambda2 + lambda3)/2, mm^2/s.
    v1 : (X, Y, Z, 3) float32 principal eigenvector in world RAS+ (sign arbitrary).
    mask : (X, Y, Z) bool, the voxels that were fitted.
    method : the fit method.
    """

    fa: NDArray[np.float32]
    md: NDArray[np.float32]
    ad: NDArray[np.float32]
    rd: NDArray[np.float32]
    v1: NDArray[np.float32]
    mask: NDArray[np.bool_]
    method: FitMethod


class TensorFitter:
    """A tensor model planned once for a study's gradient table; apply with :meth:`fit`."""

    def __init__(self, dwi: DWI, *, method: FitMethod = "WLS") -> None:
        self.method: FitMethod = method
        gtab = gradient_table(dwi.bvals, bvecs=dwi.voxel_bvecs(), b0_threshold=B0_THRESHOLD)
        self._model = TensorModel(gtab, fit_method=method)
        self._rotation = rotation_of(dwi.affine)

    def fit(self, data: NDArray[np.floating], *, mask: NDArray[np.bool_] | None = None) -> TensorMaps:
        """Fit ``data`` (X, Y, Z, N) inside ``mask`` (X, Y, Z) (whole field when None)."""
        if mask is None:
            mask = np.ones(data.shape[:3], dtype=bool)
        maps = {k: np.zeros(data.shape[:3], dtype=np.float32) for k in ("fa", "md", "ad", "rd")}
        v1 = np.zeros(data.shape[:3] + (3,), dtype=np.float32)
        if mask.any():
            # Fit only the masked voxels as a (M, N) array: DIPY then touches nothing else.
            signal = np.asarray(data[mask], dtype=np.float64)
            fit = self._model.fit(signal)
            for key in maps:
                values = np.asarray(getattr(fit, key), dtype=np.float64)
                maps[key][mask] = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
            evecs = np.nan_to_num(np.asarray(fit.evecs[..., 0], dtype=np.float64))
            v1[mask] = evecs @ self._rotation.T
        np.clip(maps["fa"], 0.0, 1.0, out=maps["fa"])
        return TensorMaps(
            fa=maps["fa"], md=maps["md"], ad=maps["ad"], rd=maps["rd"], v1=v1, mask=mask, method=self.method
        )


FIT_MARGIN_MM = 3.0
"""Default in-plane margin (mm) around the segmented cord that :func:`fit_mask` fits."""


def fit_mask(labels: NDArray[np.integer], *, zooms_mm: tuple[float, float, float], margin_mm: float = FIT_MARGIN_MM) -> NDArray[np.bool_]:
    """The voxels to fit: every labelled voxel, dilated in-plane by ``margin_mm``.

    Parameters
    ----------
    labels : (X, Y, Z) label map on the canonical grid (axial slices along the third axis).
    zooms_mm : voxel size (mm) along the three axes.
    margin_mm : in-plane margin (mm); the fit is then also valid for a slightly shifted mask.
    """
    cord = labels > 0
    if not cord.any():
        return cord
    rx = max(1, int(np.ceil(margin_mm / zooms_mm[0])))
    ry = max(1, int(np.ceil(margin_mm / zooms_mm[1])))
    structure = np.zeros((2 * rx + 1, 2 * ry + 1, 1), dtype=bool)
    xx, yy = np.mgrid[-rx : rx + 1, -ry : ry + 1]
    structure[..., 0] = (xx / rx) ** 2 + (yy / ry) ** 2 <= 1.0
    return ndimage.binary_dilation(cord, structure=structure)
