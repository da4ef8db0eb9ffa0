"""One error hierarchy for scsnet.

Every failure a user can cause or meet is a :class:`ScsnetError` with a stable ``type`` slug,
an HTTP status and a human sentence. The gateway maps them to RFC 9457 problem+json in one
place; the CLI prints ``detail`` on one line and exits 2 for input errors. Pure Python: the
gateway may import this module.
"""

from __future__ import annotations

from typing import ClassVar

PROBLEM_BASE = "https://scsnet.dev/problems/"


class ScsnetError(Exception):
    """Base of all scsnet errors. ``detail`` is one sentence a radiographer understands."""

    type_slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"
    status: ClassVar[int] = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    @property
    def type_uri(self) -> str:
        return PROBLEM_BASE + self.type_slug

    def problem(self) -> dict[str, object]:
        """The RFC 9457 problem object (without ``instance``)."""
        return {
            "type": self.type_uri,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }


class InputError(ScsnetError):
    """The study given to us cannot be analysed as it is: the client's mistake, a 4xx."""

    type_slug = "invalid-input"
    title = "The study cannot be analysed"
    status = 422


class UnreadableFileError(InputError):
    type_slug = "unreadable-file"
    title = "A file could not be read"


class UnsupportedInputError(InputError):
    type_slug = "unsupported-input"
    title = "Unsupported kind of input"
    status = 415


class GradientError(InputError):
    type_slug = "invalid-gradients"
    title = "The diffusion gradient table is unusable"


class ImageError(InputError):
    type_slug = "invalid-image"
    title = "The diffusion image is unusable"


class NoDiffusionSeriesError(InputError):
    type_slug = "no-diffusion-series"
    title = "No usable diffusion series"


class ArchiveError(InputError):
    type_slug = "invalid-archive"
    title = "The archive is unusable"


class ModelError(ScsnetError):
    """The shipped model or its manifest is missing or corrupt: the operator's problem."""

    type_slug = "model-unavailable"
    title = "The segmentation model is unavailable"
    status = 503


class ConversionError(ScsnetError):
    """dcm2niix failed or timed out on input that looked like DICOM diffusion."""

    type_slug = "conversion-failed"
    title = "DICOM conversion failed"
    status = 422


class NoSpinalCordError(InputError):
    """No spinal cord was found, or what was found is not a cord (too small or large, jumping
    between slices), or the study is of the head: no numbers are given without a cord."""

    type_slug = "no-spinal-cord"
    title = "No spinal cord in the study"


class ImplausibleMeasuresError(InputError):
    """The cord's measures are impossible for living tissue (wrong b-value units, wrong
    intensity scaling): reporting them would mislead."""

    type_slug = "implausible-measures"
    title = "The measures are not plausible for a spinal cord"


class MixedStudiesError(InputError):
    """An upload holding images of more than one patient or study: one study per job."""

    type_slug = "mixed-studies"
    title = "The upload mixes several studies"
