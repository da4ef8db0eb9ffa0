"""The pipeline end to end on a phantom with known answers, stage by stage and atomically."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import nibabel as nib
import numpy as np
import onnx
import phantoms
import pytest

from core import pipeline
from core.errors import ModelError
from core.ingest.nifti import load_nifti_dwi
from core.labels import WHITE_MATTER_CODES
from core.report.build import validate_report
from core.segment.csf_rim import CSF_MD_MM2_S, FA_FRACTION
from core.segment.runtime import Segmentation, Segmenter


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    return phantoms.region_phantom(tmp_path_factory.mktemp("phantom"))


@pytest.fixture(scope="module")
def result(phantom, decoder_dir, tmp_path_factory) -> tuple[dict, Path, list[tuple[str, float]]]:
    out = tmp_path_factory.mktemp("run") / "out"
    seen: list[tuple[str, float]] = []
    report = pipeline.analyze(
        [phantom["image"]], out_dir=out, segmenter=Segmenter(decoder_dir), progress=lambda s, f: seen.append((s, f))
    )
    return report, out, seen


def test_measures_match_the_known_tensors(result, phantom) -> None:
    report, _, _ = result
    assert [r["code"] for r in report["regions"]] == list(range(1, 9))
    for region in report["regions"]:
        code = region["code"]
        assert region["voxels"] == int((phantom["labels"] == code).sum())
        assert region["fa"]["mean"] == pytest.approx(phantom["fa"][code], abs=1e-3)
        assert region["md"]["mean"] == pytest.approx(phantom["md"][code], rel=1e-3)
        assert region["volume_mm3"] == pytest.approx(region["voxels"] * 4.0)
        # the decoder is all but certain, so the weighted mean is the binary one
        assert region["fa_weighted"] == pytest.approx(phantom["fa"][code], abs=1e-3)
        assert region["md_weighted"] == pytest.approx(phantom["md"][code], rel=1e-3)
        assert region["top_probability"] > 0.99 and 0 <= region["confidence"] <= 1
        assert set(region["augmentation_dice"]) == {"shift", "flip", "mean"}
    assert report["cord"]["voxels"] == int((phantom["labels"] > 0).sum())
    assert report["estimator"] == "binary-mean" and report["schema_version"] == "2.5"
    assert report["confidence_method"]["augmentations"] == ["shift", "flip"]
    assert report["qc"]["cord_turn_deg"] == 0.0  # the phantom's cord lies as the training's did
    assert report["anatomy"] == {"applied": True, "filled_voxels": 0, "reassigned_voxels": 0, "slices": []}
    for entry in report["slices"]:
        for key, value in entry["regions"].items():
            assert value["fa_weighted"] == pytest.approx(value["fa_mean"], abs=1e-3), key
            assert value["confidence"] is not None


def test_outputs_are_on_the_input_grid(result, phantom) -> None:
    _, out, _ = result
    labels = nib.load(str(out / "labels.nii.gz"))
    assert labels.get_data_dtype() == np.uint8
    np.testing.assert_allclose(labels.affine, phantom["affine"])
    assert np.array_equal(np.asarray(labels.dataobj), phantom["labels"])
    for name in ("fa", "md", "ad", "rd", "b0"):
        img = nib.load(str(out / f"{name}.nii.gz"))
        assert img.get_data_dtype() == np.float32 and img.shape == labels.shape
    assert (out / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_validates_and_carries_provenance(result) -> None:
    report, out, _ = result
    on_disk = json.loads((out / "report.json").read_text())
    validate_report(on_disk)
    assert on_disk["input"]["orientation"] == "RAS"
    assert on_disk["acquisition"] == {"b_values": [0.0, 800.0], "n_volumes": 32, "n_b0": 2, "n_directions": 30}
    assert on_disk["model"]["provider"] == "CPUExecutionProvider"
    assert set(on_disk["timings_s"]) == set(pipeline.STAGES)
    assert on_disk["units"]["md"] == "mm^2/s"
    assert len(on_disk["slices"]) == 4
    assert all(len(s["regions"]) == 8 for s in on_disk["slices"])


def test_progress_reports_every_stage_in_order(result) -> None:
    _, _, seen = result
    assert seen == [(s, f) for s in pipeline.STAGES for f in (0.0, 1.0)]


def test_schema_rejects_a_report_missing_its_regions(result) -> None:
    report, _, _ = result
    broken = dict(report)
    broken["regions"] = report["regions"][:7]
    with pytest.raises(jsonschema.ValidationError):
        validate_report(broken)


def test_most_compressed_slice_is_the_smallest_cord(tmp_path, decoder_dir) -> None:
    info = phantoms.region_phantom(tmp_path / "p", shape=(40, 36, 4))
    img = nib.load(str(info["image"]))
    data = np.asarray(img.dataobj).copy()
    data[:, :17, 2, :] = 0  # flatten slice 2 from behind: a smaller cord
    nib.save(nib.Nifti1Image(data, img.affine), str(info["image"]))
    report = pipeline.analyze([info["image"]], out_dir=tmp_path / "out", segmenter=Segmenter(decoder_dir))
    areas = [s["cord_area_mm2"] for s in report["slices"]]
    assert report["most_compressed_slice"] == 2 == int(np.argmin(areas))
    assert any("dorsal column is missing on slice(s) 2" in w for w in report["qc"]["warnings"])


def test_every_b0_is_averaged_wherever_it_sits(phantom) -> None:
    dwi = load_nifti_dwi(phantom["image"])
    assert dwi.is_b0.tolist() == [True] + [False] * 30 + [True]
    expected = (dwi.data[..., 0] + dwi.data[..., -1]) / 2
    np.testing.assert_allclose(dwi.mean_b0(), expected, rtol=1e-6)


def test_a_rerun_replaces_the_output_whole(phantom, decoder_dir, tmp_path) -> None:
    out = tmp_path / "out"
    first = pipeline.analyze([phantom["image"]], out_dir=out, segmenter=Segmenter(decoder_dir))
    (out / "stale.txt").write_text("from an earlier run")
    second = pipeline.analyze([phantom["image"]], out_dir=out, segmenter=Segmenter(decoder_dir))
    assert not (out / "stale.txt").exists()
    assert second["regions"] == first["regions"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failure_leaves_the_previous_result_untouched(phantom, decoder_dir, tmp_path) -> None:
    out = tmp_path / "out"
    pipeline.analyze([phantom["image"]], out_dir=out, segmenter=Segmenter(decoder_dir))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = tmp_path / "broken-model"
    phantoms.decoder_model(broken)
    model = onnx.load(str(broken / "decoder.onnx"))
    centres = next(t for t in model.graph.initializer if t.name == "centres")
    centres.CopyFrom(onnx.numpy_helper.from_array(np.arange(3, dtype=np.float32).reshape(1, 3, 1, 1), "centres"))
    onnx.save(model, str(broken / "decoder.onnx"))
    manifest = json.loads((broken / "manifest.json").read_text())
    import hashlib

    manifest["sha256"] = hashlib.sha256((broken / "decoder.onnx").read_bytes()).hexdigest()
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="returned 3 classes"):
        pipeline.analyze([phantom["image"]], out_dir=out, segmenter=Segmenter(broken))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken-model", "out"]


def test_convert_writes_a_consistent_fsl_study(phantom, tmp_path) -> None:
    sidecar = pipeline.convert([phantom["image"]], out_dir=tmp_path / "conv")
    assert sidecar["acquisition"]["n_directions"] == 30
    again = load_nifti_dwi(tmp_path / "conv" / "dwi.nii.gz")
    original = load_nifti_dwi(phantom["image"])
    np.testing.assert_allclose(again.bvecs, original.bvecs, atol=1e-6)
    np.testing.assert_allclose(again.data, original.data)
    assert json.loads((tmp_path / "conv" / "dwi.json").read_text())["input"]["format"] == "nifti"


def test_outline_voxels_with_csf_diffusion_are_trimmed_before_measuring(tmp_path, decoder_dir) -> None:
    """A mask that spills one voxel into the CSF all round: the trim gives exactly those voxels
    back, and the regions then measure their own tensors; without it CSF drags FA down."""
    ph = phantoms.region_phantom(tmp_path / "phantom", csf_rim=True)
    segmenter = Segmenter(decoder_dir)
    n_rim, n_cord = int(ph["rim"].sum()), int((ph["labels"] > 0).sum())
    report = pipeline.analyze([ph["image"]], out_dir=tmp_path / "trimmed", segmenter=segmenter)
    by_slice = report["refinement"].pop("md_threshold_by_slice_mm2_s")
    assert len(by_slice) == ph["labels"].shape[2] and all(1.0e-3 < t <= CSF_MD_MM2_S for t in by_slice)
    fa_lines = report["refinement"].pop("fa_threshold_by_slice")
    # each slice's median white-matter FA, 0.4 of it
    medians = [np.median([ph["fa"][c] for c in z_labels[np.isin(z_labels, WHITE_MATTER_CODES)]])
               for z_labels in np.moveaxis(ph["labels"], 2, 0)]
    assert fa_lines == pytest.approx([FA_FRACTION * m for m in medians], abs=2e-3)
    assert report["refinement"] == {"applied": True, "csf_contrast_pass": True, "refit": False,
                                    "md_threshold_mm2_s": CSF_MD_MM2_S, "fa_fraction_of_white_matter": FA_FRACTION,
                                    "voxels_removed": n_rim, "cord_voxels": n_cord, "first_pass_slices": []}
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / "trimmed" / "labels.nii.gz")).dataobj), ph["labels"])
    for region in report["regions"]:
        assert region["fa"]["mean"] == pytest.approx(ph["fa"][region["code"]], abs=1e-3)
        assert region["md"]["mean"] == pytest.approx(ph["md"][region["code"]], rel=1e-3)
        # the trimmed rim weighs nothing in the probability-weighted means either
        assert region["fa_weighted"] == pytest.approx(ph["fa"][region["code"]], abs=1e-3)

    kept = pipeline.analyze([ph["image"]], out_dir=tmp_path / "kept", segmenter=segmenter,
                            options=pipeline.Options(refine=False))
    assert kept["refinement"] == {"applied": False, "csf_contrast_pass": False, "refit": False,
                                  "md_threshold_mm2_s": None, "md_threshold_by_slice_mm2_s": [],
                                  "fa_fraction_of_white_matter": None, "fa_threshold_by_slice": [], "voxels_removed": 0,
                                  "cord_voxels": n_cord + n_rim, "first_pass_slices": []}
    assert "refine" in report["timings_s"] and list(report["timings_s"]) == list(pipeline.STAGES)
    on_rim = {int(c) for c in np.unique(np.asarray(nib.load(str(ph["image"])).dataobj)[..., 0][ph["rim"]] / phantoms.SCALE)}
    assert on_rim  # the rim lies on some regions: their FA is lower without the trim
    for region in kept["regions"]:
        if region["code"] in on_rim:
            assert region["fa"]["mean"] < ph["fa"][region["code"]] - 0.05


def test_masks_are_not_trimmed_when_the_cord_md_is_not_cord_like(tmp_path, decoder_dir) -> None:
    """b-values written 2.5 times too small make every MD 2.5 times too large: the cord would
    read CSF-like all over, so there is no second pass, nothing is trimmed and the report says
    why."""
    ph = phantoms.region_phantom(tmp_path / "phantom", csf_rim=True)
    bval = Path(str(ph["image"]).replace(".nii.gz", ".bval"))
    bval.write_text(" ".join(f"{float(b) / 2.5:g}" for b in bval.read_text().split()) + "\n")
    report = pipeline.analyze([ph["image"]], out_dir=tmp_path / "out", segmenter=Segmenter(decoder_dir))
    assert report["refinement"]["applied"] is True
    assert report["refinement"]["csf_contrast_pass"] is False
    assert report["refinement"]["voxels_removed"] == 0
    assert report["refinement"]["cord_voxels"] == int((ph["labels"] > 0).sum() + ph["rim"].sum())
    assert any("not refined by MD" in w for w in report["qc"]["warnings"]), report["qc"]["warnings"]


def test_no_second_pass_where_the_first_found_no_cord(phantom, decoder_dir) -> None:
    canonical, _ = load_nifti_dwi(phantom["image"]).to_canonical()
    shape = canonical.data.shape[:3]
    empty = Segmentation(labels=np.zeros(shape, np.uint8), cord_probability=np.zeros(shape, np.float32))
    maps = pipeline.fit_stage(canonical, empty.labels, pipeline.Options())
    refined = pipeline.refine_stage(canonical, canonical.mean_b0(), empty, maps, Segmenter(decoder_dir), pipeline.Options())
    assert not refined.second_pass and not refined.refitted and refined.maps is maps
    assert not refined.segmentation.labels.any() and refined.trim.voxels_removed == 0


def test_the_tensor_is_refitted_where_the_second_pass_reaches_beyond_the_first_fit(phantom, decoder_dir) -> None:
    """A first pass that found only the middle of the cord: the second finds all of it, beyond
    the first fit's margin, so the tensor is fitted again to cover every labelled voxel."""
    canonical, _ = load_nifti_dwi(phantom["image"]).to_canonical()
    segmenter = Segmenter(decoder_dir)
    full = segmenter.segment(canonical.mean_b0(), zooms_mm=canonical.zooms)
    middle = np.zeros_like(full.labels)
    ci, cj = (int(np.mean(a)) for a in np.nonzero(full.labels[:, :, 0]))
    middle[ci - 1 : ci + 2, cj - 1 : cj + 2, :] = full.labels[ci - 1 : ci + 2, cj - 1 : cj + 2, :]
    first = Segmentation(labels=middle, cord_probability=full.cord_probability)
    maps = pipeline.fit_stage(canonical, middle, pipeline.Options())
    assert np.any((full.labels > 0) & ~maps.mask)
    refined = pipeline.refine_stage(canonical, canonical.mean_b0(), first, maps, segmenter, pipeline.Options())
    assert refined.second_pass and refined.refitted and refined.maps is not maps
    assert refined.trim.voxels_removed == 0
    seg, refit = refined.segmentation, refined.maps
    assert np.array_equal(seg.labels, full.labels)
    assert np.all(refit.mask[seg.labels > 0]) and np.all(refit.fa[seg.labels > 0] > 0.3)


def test_a_hole_in_the_cord_is_filled_and_reported(tmp_path, decoder_dir) -> None:
    """A voxel inside the left lateral funiculus reads as background on the b0: the network
    leaves a hole, the whole stage fills it with its neighbours' label and says so."""
    info = phantoms.region_phantom(tmp_path / "p")
    img = nib.load(str(info["image"]))
    data = np.asarray(img.dataobj).copy()
    hole = (14, 17)
    assert info["labels"][hole + (0,)] == 1 and (info["labels"][hole[0] - 1 : hole[0] + 2, hole[1] - 1 : hole[1] + 2] == 1).all()
    data[hole[0], hole[1], :, 0] = data[hole[0], hole[1], :, -1] = 0.0  # its b0 volumes only
    nib.save(nib.Nifti1Image(data, img.affine), str(info["image"]))
    report = pipeline.analyze([info["image"]], out_dir=tmp_path / "out", segmenter=Segmenter(decoder_dir))
    assert report["anatomy"]["filled_voxels"] == info["labels"].shape[2]
    labels = np.asarray(nib.load(str(tmp_path / "out" / "labels.nii.gz")).dataobj)
    assert np.array_equal(labels, info["labels"])
    kept = pipeline.analyze([info["image"]], out_dir=tmp_path / "kept", segmenter=Segmenter(decoder_dir),
                            options=pipeline.Options(whole_masks=False))
    assert kept["anatomy"]["applied"] is False
    assert kept["regions"][0]["voxels"] == report["regions"][0]["voxels"] - info["labels"].shape[2]


def test_the_ventral_lean_labels_only_masks_the_md_trim_checks_afterwards(tmp_path, decoder_dir) -> None:
    """Both network passes of a refined analysis label with the ventral lean (the trim by MD
    gives back what is CSF); with ``--no-refine`` nothing checks the outline, so the plain
    argmax stands."""

    class Recording(Segmenter):
        def __init__(self, model_dir: Path) -> None:
            super().__init__(model_dir)
            self.leans: list[bool] = []

        def segment(self, b0, **kwargs):  # type: ignore[no-untyped-def, override]
            self.leans.append(kwargs.get("ventral_lean", False))
            return super().segment(b0, **kwargs)

    ph = phantoms.region_phantom(tmp_path / "phantom", csf_rim=True)
    refined, plain = Recording(decoder_dir), Recording(decoder_dir)
    pipeline.analyze([ph["image"]], out_dir=tmp_path / "refined", segmenter=refined)
    pipeline.analyze([ph["image"]], out_dir=tmp_path / "plain", segmenter=plain, options=pipeline.Options(refine=False))
    assert refined.leans == [True, True]
    assert plain.leans == [False]


def test_the_second_pass_brightens_gray_matter_by_fa_when_the_manifest_asks(phantom, decoder_dir, tmp_path) -> None:
    """With a manifest's ``gray_contrast_gain``, the refinement's second pass also segments the
    CSF-contrast image with the cord's inside brightened by the first fit's FA-estimated
    gray-matter share (the phantom's gray matter has lower FA), and the regions come from it
    while the outline stays the CSF-contrast image's; the decoder test model's manifest sets no
    gain, so no such image is segmented."""
    import shutil

    from core.segment.gray_contrast import ERODE_VOXELS, gray_share
    from scipy import ndimage

    class Recording(Segmenter):
        def __init__(self, model_dir: Path) -> None:
            super().__init__(model_dir)
            self.images: list[np.ndarray] = []

        def segment(self, b0, **kwargs):  # type: ignore[no-untyped-def, override]
            self.images.append(np.array(b0))
            return super().segment(b0, **kwargs)

    gained = tmp_path / "gained"
    shutil.copytree(decoder_dir, gained)
    manifest = json.loads((gained / "manifest.json").read_text())
    manifest["input"]["gray_contrast_gain"] = 0.5
    (gained / "manifest.json").write_text(json.dumps(manifest))
    canonical, _ = load_nifti_dwi(phantom["image"]).to_canonical()
    b0 = canonical.mean_b0()
    for model_dir, gain in ((gained, 0.5), (decoder_dir, 0.0)):
        segmenter = Recording(model_dir)
        assert segmenter.gray_contrast_gain == gain
        first = segmenter.segment(b0, zooms_mm=canonical.zooms, ventral_lean=True)
        maps = pipeline.fit_stage(canonical, first.labels, pipeline.Options())
        refined = pipeline.refine_stage(canonical, b0, first, maps, segmenter, pipeline.Options())
        assert refined.second_pass and len(segmenter.images) == (3 if gain else 2)
        inside = ndimage.binary_erosion(first.labels > 0, ndimage.generate_binary_structure(2, 1)[:, :, None],
                                        iterations=ERODE_VOXELS)
        share = gray_share(maps.fa, first.labels)
        gray_inside = inside & np.isin(first.labels, (4, 8))
        assert gray_inside.any() and np.all(share[gray_inside] > 0.9)
        np.testing.assert_allclose(segmenter.images[-1][inside], (b0 * (1 + gain * share))[inside], rtol=1e-5)
        # the outline is the CSF-contrast image's either way (the decoder reads it exactly)
        outline = Segmenter(decoder_dir).segment(segmenter.images[1], zooms_mm=canonical.zooms, ventral_lean=True)
        assert np.array_equal(refined.segmentation.labels > 0, outline.labels > 0)
