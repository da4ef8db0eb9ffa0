"""Run the benchmarks and write benchmarks/RESULTS.md: ``.venv/bin/python -m benchmarks``.

``--only gateway,throughput`` runs some parts; the other parts' sections already in RESULTS.md
are kept as they were (each section says when, at which commit and under what load it was
measured).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

PARTS = ("pipeline", "gateway", "throughput")
RESULTS = Path(__file__).parent / "RESULTS.md"


def _commit() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=False).stdout.strip()
    return commit + (" (with uncommitted changes)" if dirty else "")


def _header(command: str) -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), platform.processor())
    mem = int(next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))) / 1024 / 1024
    return (
        "# scsnet benchmark results\n\n"
        f"- date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}\n"
        f"- commit: {_commit()}\n"
        f"- machine: {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, no GPU, Python {platform.python_version()}\n"
        f"- command: `{command}`\n\n"
    )


def _background() -> str:
    """Other CPU users at the start of a part: the load average and any model training."""
    training = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"models.train" in (proc / "cmdline").read_bytes():
                    training.append(proc.name)
            except OSError:
                pass
    load = os.getloadavg()
    busy = f"model training running (pids {', '.join(sorted(training))})" if training else "no model training running"
    return f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at the start; {busy}"


def _section(part: str, body: str, conditions: str) -> str:
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return f"<!-- part: {part} -->\n{body.rstrip()}\n\n_Measured {stamp} at commit {_commit()}; {conditions}._\n<!-- end: {part} -->\n"


def _previous_sections() -> dict[str, str]:
    if not RESULTS.exists():
        return {}
    text = RESULTS.read_text()
    return {m["part"]: m[0] + "\n" for m in re.finditer(r"<!-- part: (?P<part>\w+) -->\n.*?<!-- end: (?P=part) -->", text, re.DOTALL)}


def _runner(part: str) -> tuple[Callable[[], Any], Callable[[Any], str]]:
    if part == "pipeline":
        from benchmarks import pipeline as module
    elif part == "gateway":
        from benchmarks import gateway as module  # type: ignore[no-redef]
    else:
        from benchmarks import throughput as module  # type: ignore[no-redef]
    return module.run, module.to_markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run (default all: {','.join(PARTS)})")
    parser.add_argument("--no-write", action="store_true", help="print the results only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; the parts are {', '.join(PARTS)}")
    sections = _previous_sections()
    for part in PARTS:
        if part not in parts:
            continue
        print(f"== {part}", flush=True)
        conditions = _background()
        run, to_markdown = _runner(part)
        body = to_markdown(run())
        end = os.getloadavg()
        sections[part] = _section(part, body, f"{conditions}; load average {end[0]:.2f} / {end[1]:.2f} at the end")
        print(sections[part], flush=True)
    command = ".venv/bin/python -m benchmarks" + ("" if set(parts) == set(PARTS) else f" --only {','.join(parts)}")
    text = _header(command) + "\n".join(sections[p] for p in PARTS if p in sections)
    if not args.no_write:
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
