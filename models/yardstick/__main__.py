"""python -m models.yardstick --studies 32 --seed 0 1 [--model models/scsnet] [--out DIR] [--keep] [--no-refine]

Render N yardstick studies per seed (a seed fixes its set), analyse each as ``scsnet analyze``
does and print Dice and FA error per study and region, then the means over all of them. ``--out`` also writes
``results.json`` there; ``--keep`` keeps each study's inputs and outputs under ``--out``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from models.yardstick.bench import run, table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=int, default=8)
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds, each a set of --studies")
    p.add_argument("--model", type=Path, default=Path("models/scsnet"))
    p.add_argument("--out", type=Path, default=None, help="write results.json here")
    p.add_argument("--keep", action="store_true", help="keep every study's files under --out")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime CPU threads")
    p.add_argument("--no-refine", action="store_true", help="score the network's first-pass masks (scsnet analyze --no-refine)")
    args = p.parse_args(argv)
    if args.keep and args.out is None:
        p.error("--keep needs --out")
    scores = [s for seed in args.seed
              for s in run(args.studies, seed=seed, model_dir=args.model, keep=args.out if args.keep else None,
                           threads=args.threads, refine=not args.no_refine)]
    print(table(scores))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps([asdict(s) for s in scores], indent=1, default=float))


if __name__ == "__main__":
    main()
