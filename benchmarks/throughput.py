"""Benchmark 4: analysed studies per minute with 1 and 2 worker processes.

For each worker count, a fresh ``scsnet serve --no-worker`` (gateway + embedded Redis, data in a
throw-away folder) gets that many ``scsnet worker`` processes (one analysis at a time each; all
on this machine, sharing its cores with the gateway); once every worker's heartbeat is seen, a
queue of 50 real-DWI studies is posted and the benchmark waits until every job has ended.
Studies per minute come from the job records: 50 over the span from the first job's creation to
the last job's end. The job-duration histogram is the one the gateway serves on ``/metrics``.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import httpx
import numpy as np

from benchmarks.gateway import _auth, _submit_real
from benchmarks.service import (
    Service,
    model_for_workers,
    parse_metrics,
    remove,
    short_tmp,
    start_service,
    wait_until,
)

STUDIES = 50
WORKER_COUNTS = (1, 2)
TIMEOUT_S = 3600.0


def _all_jobs(client: httpx.Client) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    url: str | None = "/v1/jobs?limit=100"
    while url:
        page = client.get(url).json()
        jobs += page["items"]
        url = page["links"].get("next")
    return jobs


def _histogram(service: Service) -> dict[str, Any]:
    buckets, count, total = {}, 0.0, 0.0
    for name, labels, value in parse_metrics(service.metrics()):
        if name == "scsnet_job_duration_seconds_bucket":
            buckets[labels["le"]] = int(value)
        elif name == "scsnet_job_duration_seconds_count":
            count = value
        elif name == "scsnet_job_duration_seconds_sum":
            total = value
    return {"buckets": buckets, "count": int(count), "sum_s": total}


def _seconds(a: str, b: str) -> float:
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def run_one(n_workers: int, model_dir: Any, *, studies: int = STUDIES) -> dict[str, Any]:
    tmp = short_tmp(f"scst{n_workers}-")
    service: Service | None = None
    try:
        service = start_service(tmp, model_dir=model_dir)
        key = service.create_key("bench")
        service.start_workers(n_workers)
        with httpx.Client(base_url=service.url, headers=_auth(key), timeout=60) as client:
            start = time.perf_counter()
            ids = {_submit_real(client) for _ in range(studies)}
            posted = time.perf_counter() - start

            def ended() -> list[dict[str, Any]] | None:
                jobs = [j for j in _all_jobs(client) if j["id"] in ids]
                return jobs if all(j["state"] in ("succeeded", "failed", "cancelled") for j in jobs) else None

            jobs = wait_until(ended, timeout_s=TIMEOUT_S, what=f"{studies} jobs to end", interval_s=1.0)
            wall = time.perf_counter() - start
        histogram = _histogram(service)
    finally:
        if service is not None:
            service.stop()
        remove(tmp)
    states = [j["state"] for j in jobs]
    ran = [j for j in jobs if j["started_at"] and j["finished_at"]]
    span = _seconds(min(j["created_at"] for j in jobs), max(j["finished_at"] for j in ran))
    durations = np.array([_seconds(j["started_at"], j["finished_at"]) for j in ran])
    waits = np.array([_seconds(j["created_at"], j["started_at"]) for j in ran])
    return {
        "workers": n_workers,
        "studies": studies,
        "states": {s: states.count(s) for s in sorted(set(states))},
        "post_s": posted,
        "span_s": span,
        "wall_s": wall,
        "studies_per_min": 60 * studies / span,
        "duration_s": {"p50": float(np.median(durations)), "p90": float(np.percentile(durations, 90)), "min": float(durations.min()), "max": float(durations.max())},
        "queue_wait_s_max": float(waits.max()),
        "histogram": histogram,
    }


def run(worker_counts: tuple[int, ...] = WORKER_COUNTS, *, studies: int = STUDIES) -> dict[str, Any]:
    tmp = short_tmp("scstm-")
    try:
        model, note = model_for_workers(tmp)
        print(f"  model: {note}", flush=True)
        results: dict[str, Any] = {"model": note, "runs": []}
        for n in worker_counts:
            r = run_one(n, model, studies=studies)
            print(f"  {n} worker(s): {r['studies_per_min']:.1f} studies/min, states {r['states']}, job p50 {r['duration_s']['p50']:.2f} s", flush=True)
            results["runs"].append(r)
        return results
    finally:
        remove(tmp)


def to_markdown(results: dict[str, Any]) -> str:
    lines = [
        "## Throughput (benchmark 4)",
        "",
        (f"Model: {results['model']}. Study: the real DWI (96x36x15, 35 volumes). Each worker is a `scsnet worker` "
        "process (Celery prefork, one analysis at a time) on this machine, sharing its cores with the gateway and "
        "embedded Redis. Studies/min = studies / (first job created -> last job finished), from the job records."),
        "",
        "| workers | studies | outcome | posting all (s) | span (s) | studies/min | job run time p50 / p90 / max (s) | longest queue wait (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        outcome = ", ".join(f"{n} {s}" for s, n in r["states"].items())
        d = r["duration_s"]
        lines.append(
            f"| {r['workers']} | {r['studies']} | {outcome} | {r['post_s']:.1f} | {r['span_s']:.1f} | {r['studies_per_min']:.1f} | "
            f"{d['p50']:.2f} / {d['p90']:.2f} / {d['max']:.2f} | {r['queue_wait_s_max']:.1f} |"
        )
    bounds = list(results["runs"][0]["histogram"]["buckets"]) if results["runs"] else []
    lines += [
        "",
        "Job duration histogram scraped from `/metrics` (`scsnet_job_duration_seconds`, succeeded jobs, cumulative counts):",
        "",
        "| workers | " + " | ".join(f"<= {b} s" if b != "+Inf" else "+Inf" for b in bounds) + " | count | sum (s) |",
        "|---|" + "---|" * (len(bounds) + 2),
    ]
    for r in results["runs"]:
        h = r["histogram"]
        lines.append(f"| {r['workers']} | " + " | ".join(str(h["buckets"].get(b, 0)) for b in bounds) + f" | {h['count']} | {h['sum_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(to_markdown(run()))
