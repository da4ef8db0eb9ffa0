"""The command line on good input: exit 0, result lines on stdout, progress on stderr."""

from __future__ import annotations

from pathlib import Path

import phantoms
import pytest

from cli.main import main


def test_analyze_with_progress(tmp_path: Path, decoder_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = phantoms.region_phantom(tmp_path / "study")
    out = tmp_path / "out"
    assert main(["analyze", str(info["image"]), "--out", str(out), "--model-dir", str(decoder_dir), "--progress"]) == 0
    captured = capsys.readouterr()
    assert "cord FA 0." in captured.out and str(out.absolute()) in captured.out
    assert "write" in captured.err  # the last stage shown by the bar
    assert (out / "report.json").is_file()


def test_full_maps_fit_the_whole_field(tmp_path: Path, decoder_dir: Path) -> None:
    import json

    info = phantoms.region_phantom(tmp_path / "study")
    assert main(["analyze", str(info["image"]), "--out", str(tmp_path / "o"), "--model-dir", str(decoder_dir), "--full-maps"]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["fit"]["region"] == "full-field"
    assert report["fit"]["voxels"] == 40 * 36 * 4


def test_no_refine_keeps_the_networks_masks_and_no_csf_trim_is_its_deprecated_alias(
    tmp_path: Path, decoder_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    info = phantoms.region_phantom(tmp_path / "study", csf_rim=True)
    runs = {}
    for name, flag in (("refined", []), ("kept", ["--no-refine"]), ("alias", ["--no-csf-trim"])):
        capsys.readouterr()
        assert main(["analyze", str(info["image"]), "--out", str(tmp_path / name), "--model-dir", str(decoder_dir), *flag]) == 0
        runs[name] = json.loads((tmp_path / name / "report.json").read_text())["refinement"]
        deprecated = "--no-csf-trim is deprecated; use --no-refine" in capsys.readouterr().err
        assert deprecated == (name == "alias")
    assert runs["refined"]["voxels_removed"] == int(info["rim"].sum()) > 0
    assert runs["kept"] == runs["alias"] == {
        "applied": False, "csf_contrast_pass": False, "refit": False, "md_threshold_mm2_s": None,
        "md_threshold_by_slice_mm2_s": [], "fa_fraction_of_white_matter": None, "fa_threshold_by_slice": [],
        "voxels_removed": 0, "cord_voxels": runs["refined"]["cord_voxels"] + runs["refined"]["voxels_removed"], "first_pass_slices": [],
    }


def test_model_dir_from_the_environment(tmp_path: Path, decoder_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    monkeypatch.setenv("SCSNET_MODEL_DIR", str(decoder_dir))
    info = phantoms.region_phantom(tmp_path / "study")
    assert main(["analyze", str(info["image"]), "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "report.json").read_text())["model"]["name"] == "decoder-fixture"
