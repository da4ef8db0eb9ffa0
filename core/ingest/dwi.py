"""The diffusion-weighted study as one validated object.

A :class:`DWI` carries the 4D data, its affine, the gradient table with b-vectors in **world
RAS+** and where it came from. Because the vectors live in world space, reorienting the array
(flip, transpose) needs only a new affine: the vectors stay as they are, and the tensor fit
asks for them in the array frame with :meth:`DWI.voxel_bvecs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from core.errors import ImageError
from core.ingest.gradients import check_gradients, count_directions, is_b0, rotation_of

InputFormat = Literal["nifti", "dicom"]


@dataclass(frozen=True)
class FileDigest:
    """A file we read, by name and SHA-256."""

    name: str
    sha256: str


@dataclass(frozen=True)
class Provenance:
    """Where a study came from, for the report."""

    format: InputFormat
    files: tuple[FileDigest, ...] = ()
    series_description: str | None = None
    manufacturer: str | None = None
    series_instance_uid: str | None = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class DWI:
    """A validated diffusion-weighted study.

    Attributes
    ----------
    data : (X, Y, Z, N) float32 signal, arbitrary scanner units.
    affine : (4, 4) voxel index -> world RAS+ (mm).
    bvals : (N,) b-values in s/mm^2; b=0 volumes (b < 50) are exactly 0.
    bvecs : (N, 3) unit gradient directions in world RAS+; zero rows for b=0 volumes.
    provenance : where it came from.
    """

    data: NDArray[np.float32]
    affine: NDArray[np.float64]
    bvals: NDArray[np.float64]
    bvecs: NDArray[np.float64]
    provenance: Provenance = field(default_factory=lambda: Provenance(format="nifti"))

    def __post_init__(self) -> None:
        if self.data.ndim != 4:
            raise ImageError(
                f"the image is {self.data.ndim}D with shape {tuple(self.data.shape)}; a diffusion "
                "study must be 4D (x, y, z, volumes)"
            )
        if min(self.data.shape[:3]) < 1 or self.data.shape[3] < 2:
            raise ImageError(f"the image shape {tuple(self.data.shape)} holds no usable volumes")
        if self.affine.shape != (4, 4) or not np.all(np.isfinite(self.affine)):
            raise ImageError("the image's orientation (affine) is missing or not finite")
        if abs(np.linalg.det(self.affine[:3, :3])) < 1e-9:
            raise ImageError("the image's orientation (affine) is degenerate (zero voxel size)")
        # NaN and +-Inf survive a float64 sum (which cannot overflow for float32 input): one
        # pass and no (X, Y, Z, N) boolean temporary; counted only when there is something.
        if not np.isfinite(self.data.sum(dtype=np.float64)):
            n_bad = int(np.count_nonzero(~np.isfinite(self.data)))
            raise ImageError(f"the image contains {n_bad} NaN or infinite voxel values")
        bvals, bvecs = check_gradients(self.bvals, self.bvecs, n_volumes=self.data.shape[3])
        object.__setattr__(self, "bvals", bvals)
        object.__setattr__(self, "bvecs", bvecs)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (int(self.data.shape[0]), int(self.data.shape[1]), int(self.data.shape[2]))

    @property
    def zooms(self) -> tuple[float, float, float]:
        """Voxel size (mm) along the three array axes."""
        z = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(z[0]), float(z[1]), float(z[2]))

    @property
    def is_b0(self) -> NDArray[np.bool_]:
        return is_b0(self.bvals)

    @property
    def n_directions(self) -> int:
        return count_directions(self.bvecs[~self.is_b0])

    def mean_b0(self) -> NDArray[np.float32]:
        """Mean of every b=0 volume, wherever it sits in the series. Shape (X, Y, Z)."""
        return self.data[..., self.is_b0].mean(axis=3, dtype=np.float64).astype(np.float32)

    def voxel_bvecs(self) -> NDArray[np.float64]:
        """b-vectors (N, 3) in the array's own voxel frame (what DIPY expects)."""
        return self.bvecs @ rotation_of(self.affine)

    def orientation_codes(self) -> str:
        """Axis codes such as 'LAS' or 'RAS' (nibabel's convention: where each axis points)."""
        return "".join(nib.aff2axcodes(self.affine))

    def to_canonical(self) -> tuple[DWI, Reorientation]:
        """The same study with its array in closest-canonical RAS order (flips and permutations
        only, no resampling), and the transform that maps results back to the input grid."""
        reo = Reorientation.for_affine(self.affine, self.shape)
        if reo.is_identity:
            return self, reo
        # A view: flips and axis swaps of the input array, not a copy of the whole series (the
        # pipeline reads only the b=0 volumes and the voxels it fits).
        return replace(self, data=reo.forward(self.data), affine=reo.canonical_affine), reo


@dataclass(frozen=True)
class Reorientation:
    """A flip/permutation between an input grid and its closest-canonical RAS grid."""

    ornt: NDArray[np.float64]  # nibabel orientation array, input -> RAS
    input_shape: tuple[int, int, int]
    input_affine: NDArray[np.float64]

    @classmethod
    def for_affine(cls, affine: NDArray[np.float64], shape: tuple[int, int, int]) -> Reorientation:
        ornt = nib.orientations.io_orientation(affine)
        return cls(ornt=ornt, input_shape=shape, input_affine=np.asarray(affine, dtype=np.float64))

    @property
    def is_identity(self) -> bool:
        return bool(np.array_equal(self.ornt, [[0, 1], [1, 1], [2, 1]]))

    @property
    def canonical_affine(self) -> NDArray[np.float64]:
        inv = nib.orientations.inv_ornt_aff(self.ornt, self.input_shape)
        return self.input_affine @ inv

    def forward(self, array: NDArray[np.generic]) -> NDArray[np.generic]:
        """Input grid -> canonical grid (the first three axes; trailing axes are kept)."""
        return nib.orientations.apply_orientation(array, self.ornt)

    def backward(self, array: NDArray[np.generic]) -> NDArray[np.generic]:
        """Canonical grid -> input grid (the first three axes; trailing axes are kept)."""
        inverse = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), self.ornt)
        return np.ascontiguousarray(nib.orientations.apply_orientation(array, inverse))
