"""The ``scsnet`` command line: ``analyze`` and ``convert`` on local files.

Exit status: 0 success; 2 bad input or usage (one line on stderr saying what is wrong);
3 the model is unavailable; 1 an unexpected internal error; ``scsnet submit`` also 4 when the
server cannot be reached (connection refused, no answer in time).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from core.errors import ModelError, ScsnetError

EXIT_INPUT = 2
EXIT_MODEL = 3
EXIT_INTERNAL = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scsnet", description="Eight-region spinal-cord DTI measures from a diffusion study."
    )
    parser.add_argument("--debug", action="store_true", help="show a traceback on internal errors")
    sub = parser.add_subparsers(dest="command", required=True)

    analyze = sub.add_parser("analyze", help="segment the cord, fit the tensor, write measures and masks")
    analyze.add_argument("inputs", nargs="+", type=Path, help="NIfTI, DICOM files or folders, or a .zip of DICOM")
    analyze.add_argument("--out", required=True, type=Path, help="output folder (replaced atomically)")
    analyze.add_argument("--bval", type=Path, help="b-value file for a NIfTI input")
    analyze.add_argument("--bvec", type=Path, help="b-vector file for a NIfTI input (3xN or Nx3)")
    analyze.add_argument("--progress", action="store_true", help="show a progress bar by stage")
    analyze.add_argument("--full-maps", action="store_true", help="fit the tensor on the whole field, not just the cord")
    analyze.add_argument("--no-refine", action="store_true",
                         help="keep the network's first-pass masks: no refinement by MD (no second pass "
                              "on the CSF-brightened b0, no trim of CSF-like outline voxels); the masks are still "
                              "made whole (holes filled, stray pieces joined; see report.json 'anatomy')")
    analyze.add_argument("--no-csf-trim", action="store_true", help="deprecated alias of --no-refine (removed in 0.3)")
    analyze.add_argument("--model-dir", type=Path, help="model folder (default: $SCSNET_MODEL_DIR or the shipped model)")

    convert = sub.add_parser("convert", help="only convert and check the study: dwi.nii.gz, .bval, .bvec, .json")
    convert.add_argument("inputs", nargs="+", type=Path)
    convert.add_argument("--out", required=True, type=Path)
    convert.add_argument("--bval", type=Path)
    convert.add_argument("--bvec", type=Path)

    from cli import service as service_cli

    service_cli.add_commands(sub)
    return parser


@contextmanager
def _progress_bar(enabled: bool) -> Iterator[object]:
    """A rich progress bar with one step per pipeline stage, or a no-op."""
    from core.pipeline import STAGES, no_progress

    if not enabled:
        yield no_progress
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),  # stdout stays for the result lines
    ) as bar:
        task = bar.add_task("starting", total=len(STAGES))

        def report(stage: str, fraction: float) -> None:
            done = STAGES.index(stage) + (1 if fraction >= 1.0 else 0)
            bar.update(task, completed=done, description=stage)

        yield report


def _run(args: argparse.Namespace) -> int:
    from cli import service as service_cli

    if args.command in service_cli.COMMANDS:
        return service_cli.run(args)

    from core import pipeline
    from core.settings import CoreSettings

    settings = CoreSettings()
    if args.command == "convert":
        sidecar = pipeline.convert(
            args.inputs, out_dir=args.out, bval=args.bval, bvec=args.bvec, limits=settings.upload_limits
        )
        acq = sidecar["acquisition"]
        print(f"converted {acq['n_volumes']} volumes ({acq['n_b0']} b=0, {acq['n_directions']} directions) into {args.out}")
        return 0

    from core.segment.runtime import Segmenter

    if args.no_csf_trim:
        print("scsnet: warning: --no-csf-trim is deprecated; use --no-refine", file=sys.stderr)
    segmenter = Segmenter(args.model_dir or settings.model_dir, threads=settings.onnx_threads)
    with _progress_bar(args.progress) as progress:
        report = pipeline.analyze(
            args.inputs,
            out_dir=args.out,
            segmenter=segmenter,
            bval=args.bval,
            bvec=args.bvec,
            options=pipeline.Options(full_maps=args.full_maps, refine=not (args.no_refine or args.no_csf_trim)),
            limits=settings.upload_limits,
            progress=progress,  # type: ignore[arg-type]
        )
    cord = report["cord"]
    fa, md = cord["fa"]["mean"], cord["md"]["mean"]
    summary = f"cord FA {fa:.3f}, MD {md * 1e3:.3f} x10^-3 mm^2/s" if fa is not None else "no cord found"
    print(f"{summary}; {len(report['qc']['warnings'])} QC warning(s)")
    print(f"outputs in {args.out} (report.json, labels.nii.gz, qc.png, ...)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scsnet`` console script."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except ModelError as exc:
        print(f"scsnet: model unavailable: {exc.detail}", file=sys.stderr)
        return EXIT_MODEL
    except ScsnetError as exc:
        print(f"scsnet: error: {exc.detail}", file=sys.stderr)
        return EXIT_INPUT if exc.status < 500 else EXIT_INTERNAL
    except KeyboardInterrupt:
        print("scsnet: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line for users, the traceback with --debug
        if args.debug:
            traceback.print_exc()
        print(f"scsnet: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
