"""The shipped model on the one real cervical DWI (sct_tutorial_dmri): cord on every slice,
patient's left at smaller world x, dorsal columns posterior, little CSF inside the mask."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "data" / "sct_tutorial_dmri" / "dmri.nii.gz"
SHIPPED = ROOT / "models" / "scsnet"


def test_shipped_model_on_real_dwi() -> None:
    from models.evaluate import SliceSegmenter, segment_real

    rows = segment_real(SliceSegmenter(SHIPPED), REAL)["rows"]
    assert len(rows) == 15
    for r in rows:
        assert 35.0 < r["cord_mm2"] < 130.0, r
        assert r["left_at_smaller_x"], r
        assert r["dorsal_posterior"], r
        # voxels whose MD says "mostly CSF": the mask must not swallow the CSF ring
        assert r["csf_like_pct"] < 35.0, r
    assert sum(r["csf_like_pct"] for r in rows) / len(rows) < 15.0
