"""Benchmark 1 and 2: the analysis pipeline and the ONNX model.

1. ``scsnet analyze`` as a separate process (wall time, peak RSS) on the real DWI and on a
   128x128x20x33 full-field study; per-stage times from the report and per-stage peak RSS
   measured in-process (Linux ``clear_refs`` resets the high-water mark between stages).
   Baseline, measured in the same run: DIPY WLS fitted on the whole field (the SCT-style
   approach), its tensor step alone; and the cord-mean FA both ways. Also the analysis alone in
   a warm process (libraries imported, model loaded), which is what a worker pays per job.
2. ONNX model slices per second on the CPU, batch 1 and batched, at the model's crop size.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from benchmarks.studies import full_field_study, real_study


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def run_cli(image: Path, bval: Path, bvec: Path, out: Path) -> dict[str, Any]:
    """``scsnet analyze`` in its own process: wall time (s), peak RSS (MB), the report."""
    scsnet = Path(sys.executable).parent / "scsnet"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run([str(scsnet), "analyze", str(image), "--bval", str(bval), "--bvec", str(bvec), "--out", str(out)], check=True, capture_output=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    report = json.loads((out / "report.json").read_text())
    return {"wall_s": wall, "peak_rss_mb": max(peak, before) / 1024, "report": report}


def import_time(image: Path, bval: Path, bvec: Path, out: Path) -> dict[str, Any]:
    """``scsnet analyze`` under ``python -X importtime``: the seconds spent importing, in all and
    by top-level package (the largest eight), summed from each module's own time."""
    scsnet = Path(sys.executable).parent / "scsnet"
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(scsnet), "analyze", str(image), "--bval", str(bval), "--bvec", str(bvec), "--out", str(out)],
        check=True, capture_output=True, text=True,
    )
    by_package: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if len(fields) != 3 or not fields[0].strip().isdigit():
            continue  # the header, or a line that is not importtime's
        package = fields[2].strip().split(".")[0]
        by_package[package] = by_package.get(package, 0.0) + int(fields[0]) / 1e6
    top = dict(sorted(by_package.items(), key=lambda kv: -kv[1])[:8])
    return {"total_s": sum(by_package.values()), "top_s": top}


def stage_memory(image: Path, bval: Path, bvec: Path, out: Path) -> dict[str, float]:
    """Peak RSS (MB) reached during each stage, in this process."""
    from core import pipeline
    from core.segment.runtime import Segmenter
    from core.settings import SHIPPED_MODEL_DIR

    peaks: dict[str, float] = {}

    def progress(stage: str, fraction: float) -> None:
        if fraction == 0.0:
            _reset_peak()
        else:
            peaks[stage] = _peak_rss_mb()

    pipeline.analyze([image], out_dir=out, segmenter=Segmenter(SHIPPED_MODEL_DIR), bval=bval, bvec=bvec, progress=progress)
    return peaks


def warm_analysis(image: Path, bval: Path, bvec: Path, out: Path, repeats: int = 3) -> float:
    """Median wall time (s) of ``pipeline.analyze`` in a process that has already imported its
    libraries and loaded the model: what each job costs a long-lived worker process."""
    from core import pipeline
    from core.segment.runtime import load_segmenter
    from core.settings import SHIPPED_MODEL_DIR

    segmenter = load_segmenter(str(SHIPPED_MODEL_DIR))
    times = []
    for n in range(repeats + 1):  # the first run warms caches and is not counted
        start = time.perf_counter()
        pipeline.analyze([image], out_dir=out / str(n), segmenter=segmenter, bval=bval, bvec=bvec)
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def baseline_full_field(image: Path, bval: Path, bvec: Path, labels_path: Path) -> dict[str, float]:
    """DIPY WLS on every voxel of the field (the tensor step alone), and the cord-mean FA."""
    from dipy.core.gradients import gradient_table
    from dipy.io.gradients import read_bvals_bvecs
    from dipy.reconst.dti import TensorModel

    img = nib.load(str(image))
    data = np.asarray(img.dataobj, dtype=np.float32)
    bvals, bvecs = read_bvals_bvecs(str(bval), str(bvec))
    gtab = gradient_table(bvals, bvecs=bvecs, b0_threshold=50)
    start = time.perf_counter()
    fit = TensorModel(gtab, fit_method="WLS").fit(data)
    fa = fit.fa
    seconds = time.perf_counter() - start
    cord = np.asarray(nib.load(str(labels_path)).dataobj) > 0
    return {"tensor_s": seconds, "cord_fa": float(np.nanmean(fa[cord])), "voxels": int(np.prod(data.shape[:3]))}


def inference(batch_sizes: tuple[int, ...] = (1, 8, 32), repeats: int = 3) -> dict[str, Any]:
    """Slices per second of the shipped model at its crop size, CPU provider."""
    from core.segment.runtime import Segmenter
    from core.settings import SHIPPED_MODEL_DIR

    seg = Segmenter(SHIPPED_MODEL_DIR)
    h, w = seg.manifest.input.crop_size_px
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"provider": seg.provider, "crop": [h, w], "slices_per_s": {}}
    for n in batch_sizes:
        batch = rng.normal(size=(n, h, w)).astype(np.float32)
        seg.probabilities(batch)  # warm-up
        best = min(_timed(lambda: seg.probabilities(batch)) for _ in range(repeats))
        out["slices_per_s"][n] = n / best
    return out


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run() -> dict[str, Any]:
    results: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="scsnet-bench-"))
    try:
        studies = {"real 96x36x15x35": real_study(), "full-field 128x128x20x33": full_field_study(tmp / "ff")}
        for name, (image, bval, bvec) in studies.items():
            cli = run_cli(image, bval, bvec, tmp / f"out-{len(results)}")
            imports = import_time(image, bval, bvec, tmp / f"imports-{len(results)}")
            mem = stage_memory(image, bval, bvec, tmp / f"mem-{len(results)}")
            warm = warm_analysis(image, bval, bvec, tmp / f"warm-{len(results)}")
            base = baseline_full_field(image, bval, bvec, tmp / f"out-{len(results)}" / "labels.nii.gz")
            cord_fa = cli["report"]["cord"]["fa"]["mean"]
            results[name] = {
                "process_wall_s": cli["wall_s"],
                "process_peak_rss_mb": cli["peak_rss_mb"],
                "stages_s": cli["report"]["timings_s"],
                "import_s": imports["total_s"],
                "import_top_s": imports["top_s"],
                "stage_peak_rss_mb": mem,
                "baseline_tensor_s": base["tensor_s"],
                "baseline_voxels": base["voxels"],
                "fitted_voxels": cli["report"]["fit"]["voxels"],
                "speedup_vs_baseline_tensor": base["tensor_s"] / cli["wall_s"],
                "warm_analysis_s": warm,
                "warm_speedup_vs_baseline_tensor": base["tensor_s"] / warm,
                "cord_fa": cord_fa,
                "baseline_cord_fa": base["cord_fa"],
                "cord_fa_difference_pct": 100 * abs(cord_fa - base["cord_fa"]) / base["cord_fa"],
            }
        results["inference"] = inference()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def to_markdown(results: dict[str, Any]) -> str:
    from core.pipeline import STAGES

    stage_columns = " | ".join(STAGES)
    lines = ["## Pipeline (benchmark 1)", "", f"| study | `scsnet analyze` process (s) | imports (s) | peak RSS (MB) | {stage_columns} | fitted voxels | baseline: DIPY WLS whole field, tensor step (s) | speed-up (process) | analysis in a warm worker (s) | speed-up (warm) | cord FA ours / baseline (diff %) |", "|---|---|---|---|" + "---|" * len(STAGES) + "---|---|---|---|---|---|"]
    for name, r in results.items():
        if name == "inference":
            continue
        st = r["stages_s"]
        lines.append(
            f"| {name} | {r['process_wall_s']:.2f} | {r['import_s']:.2f} | {r['process_peak_rss_mb']:.0f} | "
            + " | ".join(f"{st[s]:.3f}" for s in STAGES)
            + f" | {r['fitted_voxels']} of {r['baseline_voxels']} | {r['baseline_tensor_s']:.2f} | {r['speedup_vs_baseline_tensor']:.1f}x | "
            f"{r['warm_analysis_s']:.2f} | {r['warm_speedup_vs_baseline_tensor']:.1f}x | "
            f"{r['cord_fa']:.4f} / {r['baseline_cord_fa']:.4f} ({r['cord_fa_difference_pct']:.3f}) |"
        )
    lines += ["", "'process': the whole `scsnet analyze` command, interpreter start, imports and model load "
              "included. 'imports': the time `python -X importtime` counts for the same command (its own "
              "run; importtime slows imports a little). 'warm': `pipeline.analyze` in a process that "
              "already holds its libraries and the model, as a long-lived Celery worker runs every job "
              "(median of 3 after one warm-up).",
              "", "Import time by top-level package (s):", ""]
    for name, r in results.items():
        if name != "inference":
            lines.append(f"- {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["import_top_s"].items()))
    lines += ["", "Peak RSS per stage, in-process (MB):", ""]
    for name, r in results.items():
        if name != "inference":
            lines.append(f"- {name}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["stage_peak_rss_mb"].items()))
    inf = results["inference"]
    lines += ["", "## ONNX inference (benchmark 2)", "", f"Provider {inf['provider']}, crop {inf['crop'][0]}x{inf['crop'][1]} at the model spacing.", "", "| batch | slices/s |", "|---|---|"]
    lines += [f"| {n} | {v:.1f} |" for n, v in inf["slices_per_s"].items()]
    return "\n".join(lines) + "\n"
