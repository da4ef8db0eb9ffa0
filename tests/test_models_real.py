"""The shipped model on the one real cervical DWI (sct_tutorial_dmri): cord on every slice,
patient's left at smaller world x, dorsal columns posterior."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "data" / "sct_tutorial_dmri" / "dmri.nii.gz"
SHIPPED = ROOT / "models" / "scsnet"


@pytest.mark.skipif(not REAL.exists(), reason=f"real DWI copy not present at {REAL}")
@pytest.mark.skipif(not (SHIPPED / "manifest.json").exists(), reason="no shipped model yet")
def test_shipped_model_on_real_dwi() -> None:
    from models.evaluate import SliceSegmenter, segment_real

    rows = segment_real(SliceSegmenter(SHIPPED), REAL)["rows"]
    assert len(rows) == 15
    for r in rows:
        assert 35.0 < r["cord_mm2"] < 130.0, r
        assert r["left_at_smaller_x"], r
        assert r["dorsal_posterior"], r
