"""The eight-region label table: the single source of truth for codes, names, sides, colours
and the SNOMED CT codes used in DICOM SEG.

The codes are a public contract (reports, masks, DICOM SEG and the API all use them):

====  ==========================
code  region
====  ==========================
0     background (not cord)
1     left lateral funiculus
2     left dorsal column
3     left ventral funiculus
4     left gray matter
5     right lateral funiculus
6     right dorsal column
7     right ventral funiculus
8     right gray matter
====  ==========================

Left and right are the *patient's*, decided in world (RAS+) coordinates, never from array
indices or display conventions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Side = Literal["left", "right"]
Tissue = Literal["lateral", "dorsal", "ventral", "gray"]


@dataclass(frozen=True)
class Region:
    """One labelled cord region.

    ``snomed`` is the (code, meaning) of the anatomic structure; laterality is coded separately
    (SNOMED CT 7771000 left, 24028007 right).
    """

    code: int
    key: str
    name: str
    side: Side
    tissue: Tissue
    colour: tuple[int, int, int]
    snomed: tuple[str, str]


BACKGROUND = 0
N_CLASSES = 9  # background plus eight regions

_SNOMED: dict[Tissue, tuple[str, str]] = {
    "lateral": ("14892003", "Lateral funiculus"),
    "dorsal": ("59752008", "Dorsal funiculus"),
    "ventral": ("31701002", "Ventral funiculus"),
    "gray": ("12958003", "Spinal cord gray matter"),
}
_TISSUE_NAME: dict[Tissue, str] = {
    "lateral": "lateral funiculus",
    "dorsal": "dorsal column",
    "ventral": "ventral funiculus",
    "gray": "gray matter",
}
LATERALITY_SNOMED: dict[Side, tuple[str, str]] = {
    "left": ("7771000", "Left"),
    "right": ("24028007", "Right"),
}

# Colours (RGB 0-255) chosen to be distinct on a gray b0 and between sides: warm hues on the
# patient's left, cool hues on the right. Used by qc.png and DICOM SEG alike.
_COLOURS: dict[tuple[Side, Tissue], tuple[int, int, int]] = {
    ("left", "lateral"): (230, 25, 75),
    ("left", "dorsal"): (255, 225, 25),
    ("left", "ventral"): (245, 130, 48),
    ("left", "gray"): (240, 50, 230),
    ("right", "lateral"): (0, 130, 200),
    ("right", "dorsal"): (60, 180, 75),
    ("right", "ventral"): (70, 240, 240),
    ("right", "gray"): (145, 30, 180),
}

_ORDER: tuple[Tissue, ...] = ("lateral", "dorsal", "ventral", "gray")


def _build() -> tuple[Region, ...]:
    regions = []
    for side_index, side in enumerate(("left", "right")):
        for tissue_index, tissue in enumerate(_ORDER):
            code = 1 + 4 * side_index + tissue_index
            regions.append(
                Region(
                    code=code,
                    key=f"{side}_{tissue}",
                    name=f"{side} {_TISSUE_NAME[tissue]}",
                    side=side,  # type: ignore[arg-type]
                    tissue=tissue,
                    colour=_COLOURS[(side, tissue)],  # type: ignore[index]
                    snomed=_SNOMED[tissue],
                )
            )
    return tuple(regions)


REGIONS: tuple[Region, ...] = _build()
BY_CODE: dict[int, Region] = {r.code: r for r in REGIONS}
BY_KEY: dict[str, Region] = {r.key: r for r in REGIONS}
GRAY_MATTER_CODES: tuple[int, ...] = tuple(r.code for r in REGIONS if r.tissue == "gray")
WHITE_MATTER_CODES: tuple[int, ...] = tuple(r.code for r in REGIONS if r.tissue != "gray")
"""The six funiculi (lateral, dorsal and ventral, both sides)."""


def mirror_code(code: int) -> int:
    """The code of the same tissue on the other side (0 stays 0).

    A left-right flip of an image must map every label through this, or left and right swap
    meaning.
    """
    if code == BACKGROUND:
        return BACKGROUND
    return code + 4 if code <= 4 else code - 4


MIRROR_LUT: tuple[int, ...] = tuple(mirror_code(c) for c in range(N_CLASSES))


def label_table() -> list[dict[str, object]]:
    """The label table as plain data, as written into model manifests and reports."""
    return [
        {"code": r.code, "key": r.key, "name": r.name, "side": r.side, "tissue": r.tissue}
        for r in REGIONS
    ]
