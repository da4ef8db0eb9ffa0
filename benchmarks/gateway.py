"""Benchmark 3: the HTTP gateway under load, against a real ``scsnet serve`` on 127.0.0.1.

(a) Status polls: ``GET /v1/jobs/{id}`` by an asyncio + httpx load generator, full body (200)
    and conditional (``If-None-Match`` -> 304), on succeeded jobs and on queued jobs (whose view
    also counts the jobs ahead): closed loop at several concurrencies (N connections, each sending
    its next request when the previous one is answered: the capacity), and open loop at 500/s
    offered (requests on a fixed schedule, latency from the scheduled time: the goal check);
    requests per second and p50/p99 latency seen by the client. The load generator runs on the
    same machine and takes CPU from the gateway; the CPU time per request of both is reported.
(b) 20 parallel uploads of a ~50 MB study (the real DWI padded with noise, a valid study the
    gateway accepts: streamed to disk, hashed, sniffed, gradients checked, job stored and
    queued) while the gateway process's RSS is sampled every 10 ms.

The gateway runs as ``scsnet serve --no-worker`` (embedded Redis, no worker competing for the 2
cores during the measurement); a ``scsnet worker`` is started only to bring the succeeded jobs
to their end before the polls, and stopped again.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import resource
import threading
import time
from pathlib import Path
from typing import Any, Self

import httpx
import numpy as np
import psutil

from benchmarks.service import (
    Service,
    model_for_workers,
    parse_metrics,
    remove,
    short_tmp,
    start_service,
    wait_until,
)
from benchmarks.studies import padded_study, real_study

POLL_ROUTE = "/v1/jobs/{job_id}"
CONCURRENCIES = (1, 4, 16, 64)
OPEN_RATES = (500.0,)
OPEN_CONNECTIONS = 16
POLL_SECONDS = 6.0
POLL_MAX_REQUESTS = 30_000
WARMUP_REQUESTS = 300
UPLOADS = 20
UPLOAD_BYTES = 50_000_000


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _submit_real(client: httpx.Client) -> str:
    image, bval, bvec = real_study()
    files = [("files", (image.name, image.read_bytes())), ("bval", (bval.name, bval.read_bytes())), ("bvec", (bvec.name, bvec.read_bytes()))]
    response = client.post("/v1/jobs", files=files)
    response.raise_for_status()
    return str(response.json()["id"])


def _prepare_jobs(service: Service, key: str, *, succeeded: int = 5, queued: int = 10) -> dict[str, list[str]]:
    """``succeeded`` jobs run to the end by a temporary worker, then ``queued`` jobs left queued."""
    with httpx.Client(base_url=service.url, headers=_auth(key), timeout=60) as client:
        service.start_workers(1)
        done = [_submit_real(client) for _ in range(succeeded)]

        def finished() -> bool:
            states = [client.get(f"/v1/jobs/{j}").json()["state"] for j in done]
            if "failed" in states:
                raise RuntimeError(f"a benchmark job failed: {states}")
            return all(s == "succeeded" for s in states)

        wait_until(finished, timeout_s=300, what="the jobs to succeed", interval_s=0.5)
        service.stop_workers()
        waiting = [_submit_real(client) for _ in range(queued)]
        if any(client.get(f"/v1/jobs/{j}").json()["state"] != "queued" for j in waiting):
            raise RuntimeError("a job meant to stay queued did not (is a worker still running?)")
    return {"succeeded": done, "queued": waiting}


def _route_histogram(service: Service) -> dict[float, float]:
    """The gateway's own latency histogram of the poll route (cumulative counts by bound)."""
    return {
        float(labels["le"]): value
        for name, labels, value in parse_metrics(service.metrics())
        if name == "scsnet_http_request_duration_seconds_bucket" and labels.get("route") == POLL_ROUTE
    }


async def _etags(client: httpx.AsyncClient, job_ids: list[str]) -> dict[str, str]:
    return {j: (await client.get(f"/v1/jobs/{j}")).headers["ETag"] for j in job_ids}


def _summary(latencies: list[float], statuses: dict[int, int], wall: float) -> dict[str, Any]:
    lat = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "seconds": wall,
        "per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(lat.max()),
        "statuses": statuses,
    }


def _clients(url: str, key: str, n: int) -> list[httpx.AsyncClient]:
    """``n`` clients of one keep-alive connection each: one httpx pool shared by many concurrent
    requests costs the client about twice the CPU per request (more than the gateway spends),
    which would measure the load generator instead of the gateway."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return [httpx.AsyncClient(base_url=url, headers=_auth(key), limits=limits, timeout=30) for _ in range(n)]


async def _closed_loop(url: str, key: str, job_ids: list[str], *, concurrency: int, conditional: bool, seconds: float, max_requests: int) -> dict[str, Any]:
    """``concurrency`` connections, each sending its next poll as soon as the last is answered."""
    clients = _clients(url, key, concurrency)
    try:
        etags = await _etags(clients[0], job_ids)
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        budget = {"warmup": WARMUP_REQUESTS, "left": max_requests}
        deadline = float("inf")

        async def one(i: int, measured: bool) -> None:
            client, n = clients[i], i
            while True:
                if not measured:
                    if budget["warmup"] <= 0:
                        return
                    budget["warmup"] -= 1
                elif budget["left"] <= 0 or time.perf_counter() >= deadline:
                    return
                else:
                    budget["left"] -= 1
                job = job_ids[n % len(job_ids)]
                n += concurrency
                headers = {"If-None-Match": etags[job]} if conditional else None
                start = time.perf_counter()
                response = await client.get(f"/v1/jobs/{job}", headers=headers)
                elapsed = time.perf_counter() - start
                if measured:
                    latencies.append(elapsed)
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        # warm-up first (every connection opened), then the measured window
        await asyncio.gather(*(one(i, False) for i in range(concurrency)))
        deadline = time.perf_counter() + seconds
        start = time.perf_counter()
        await asyncio.gather(*(one(i, True) for i in range(concurrency)))
        return _summary(latencies, statuses, time.perf_counter() - start)
    finally:
        for c in clients:
            await c.aclose()


async def _open_loop(url: str, key: str, job_ids: list[str], *, rate: float, conditional: bool, seconds: float, connections: int = OPEN_CONNECTIONS) -> dict[str, Any]:
    """Polls due on a fixed schedule of ``rate`` per second, whatever the answers' delay (the way
    many independent clients poll), sent over ``connections`` keep-alive connections. Each
    latency runs from the request's due time, so a request that waited for a free connection
    counts its wait (no coordinated omission)."""
    clients = _clients(url, key, connections)
    try:
        etags = await _etags(clients[0], job_ids)
        for _ in range(max(1, WARMUP_REQUESTS // connections)):
            await asyncio.gather(*(c.get(f"/v1/jobs/{job_ids[i % len(job_ids)]}") for i, c in enumerate(clients)))
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        due: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
        start = time.perf_counter() + 0.01
        for i in range(int(rate * seconds)):
            due.put_nowait((i, start + i / rate))
        for _ in clients:
            due.put_nowait(None)

        async def connection(client: httpx.AsyncClient) -> None:
            while (item := await due.get()) is not None:
                i, scheduled = item
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                job = job_ids[i % len(job_ids)]
                response = await client.get(f"/v1/jobs/{job}", headers={"If-None-Match": etags[job]} if conditional else None)
                latencies.append(time.perf_counter() - scheduled)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        await asyncio.gather(*(connection(c) for c in clients))
        return _summary(latencies, statuses, time.perf_counter() - start)
    finally:
        for c in clients:
            await c.aclose()


def _measured(service: Service, run: Any, *, expected: int) -> dict[str, Any]:
    """Run one load (a coroutine factory) and add the CPU both sides spent and the gateway's own
    latency histogram over it (warm-up and ETag fetches included in both)."""
    gateway = psutil.Process(service.pid)
    before_hist = _route_histogram(service)
    gw_cpu = sum(gateway.cpu_times()[:2])
    me = resource.getrusage(resource.RUSAGE_SELF)
    gc.collect()
    gc.disable()  # no collector pauses in the load generator (it is not what is measured)
    try:
        result = asyncio.run(run())
    finally:
        gc.enable()
    me_after = resource.getrusage(resource.RUSAGE_SELF)
    gw_cpu = sum(gateway.cpu_times()[:2]) - gw_cpu
    after_hist = _route_histogram(service)
    served = after_hist.get(float("inf"), 0) - before_hist.get(float("inf"), 0)
    within_50ms = after_hist.get(0.05, 0) - before_hist.get(0.05, 0)
    client_cpu = (me_after.ru_utime + me_after.ru_stime) - (me.ru_utime + me.ru_stime)
    if set(result["statuses"]) != {expected}:
        raise RuntimeError(f"unexpected statuses {result['statuses']} (wanted only {expected})")
    return {
        **result,
        "gateway_cpu_ms_per_request": 1000 * gw_cpu / max(served, 1),
        "client_cpu_ms_per_request": 1000 * client_cpu / max(served, 1),
        "gateway_within_50ms_pct": 100 * within_50ms / max(served, 1),
    }


def poll_benchmark(service: Service, key: str, jobs: dict[str, list[str]]) -> list[dict[str, Any]]:
    rows = []
    for state, job_ids in jobs.items():
        for conditional in (False, True):
            expected = 304 if conditional else 200
            loads: list[tuple[str, Any]] = [
                (
                    f"closed, {c} conn.",
                    lambda c=c, j=job_ids, cond=conditional: _closed_loop(
                        service.url, key, j, concurrency=c, conditional=cond, seconds=POLL_SECONDS, max_requests=POLL_MAX_REQUESTS
                    ),
                )
                for c in CONCURRENCIES
            ]
            loads += [
                (
                    f"open, {r:g}/s offered",
                    lambda r=r, j=job_ids, cond=conditional: _open_loop(service.url, key, j, rate=r, conditional=cond, seconds=POLL_SECONDS),
                )
                for r in OPEN_RATES
            ]
            for load, run in loads:
                row = {"job_state": state, "conditional": conditional, "load": load, **_measured(service, run, expected=expected)}
                rows.append(row)
                print(
                    f"  poll {state:9s} {expected} {load:20s}: {row['per_s']:6.0f}/s  p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
                    f"gateway {row['gateway_cpu_ms_per_request']:.2f} ms CPU/req, client {row['client_cpu_ms_per_request']:.2f}",
                    flush=True,
                )
    return rows


class _RssSampler:
    """Samples a process's RSS in a thread."""

    def __init__(self, pid: int, interval_s: float = 0.01) -> None:
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.process.memory_info().rss))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, t0: float, t1: float) -> list[int]:
        return [rss for t, rss in self.samples if t0 <= t <= t1]


async def _uploads(url: str, key: str, image: Path, bval: Path, bvec: Path, n: int) -> list[tuple[int, dict[str, Any], float]]:
    async with httpx.AsyncClient(base_url=url, headers=_auth(key), timeout=600, limits=httpx.Limits(max_connections=n)) as client:

        async def one() -> tuple[int, dict[str, Any], float]:
            start = time.perf_counter()
            with open(image, "rb") as handle:  # noqa: ASYNC230 - streamed by httpx in 64 KiB reads (page cache)
                files = [("files", (image.name, handle)), ("bval", (bval.name, bval.read_bytes())), ("bvec", (bvec.name, bvec.read_bytes()))]
                response = await client.post("/v1/jobs", files=files)
            return response.status_code, response.json(), time.perf_counter() - start

        return await asyncio.gather(*(one() for _ in range(n)))


def upload_benchmark(service: Service, key: str, tmp: Path, *, n: int = UPLOADS) -> dict[str, Any]:
    image, bval, bvec = padded_study(tmp / "padded", target_bytes=UPLOAD_BYTES)
    size = image.stat().st_size
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    # one upload first, so that the baseline is a gateway that has already taken one
    asyncio.run(_uploads(service.url, key, image, bval, bvec, 1))
    with _RssSampler(service.pid) as rss:
        time.sleep(1.0)
        t0 = time.perf_counter()
        answers = asyncio.run(_uploads(service.url, key, image, bval, bvec, n))
        t1 = time.perf_counter()
        time.sleep(2.0)
    baseline = float(np.median(rss.between(t0 - 1.0, t0)))
    during = rss.between(t0, t1)
    after = float(np.median(rss.between(t1 + 1.0, t1 + 2.0)))
    statuses = [status for status, _, _ in answers]
    received_ok = sum(1 for _, body, _ in answers if body.get("input", {}).get("files", [{}])[0].get("sha256") == digest)
    mb = 1024 * 1024
    return {
        "uploads": n,
        "upload_bytes": size,
        "statuses": {s: statuses.count(s) for s in set(statuses)},
        "intact": received_ok,
        "wall_s": t1 - t0,
        "mb_per_s": n * size / mb / (t1 - t0),
        "upload_s_p50": float(np.median([s for _, _, s in answers])),
        "upload_s_max": float(max(s for _, _, s in answers)),
        "rss_baseline_mb": baseline / mb,
        "rss_peak_mb": max(during) / mb,
        "rss_after_mb": after / mb,
        "rss_growth_mb": (max(during) - baseline) / mb,
        "samples": len(during),
    }


def run() -> dict[str, Any]:
    tmp = short_tmp("scsb-")
    service: Service | None = None
    try:
        model, model_note = model_for_workers(tmp)
        service = start_service(tmp, model_dir=model)
        key = service.create_key("bench")
        start_rss = psutil.Process(service.pid).memory_info().rss / 1024 / 1024
        jobs = _prepare_jobs(service, key)
        polls = poll_benchmark(service, key, jobs)
        uploads = upload_benchmark(service, key, tmp)
        print(f"  uploads: {uploads}", flush=True)
        return {"polls": polls, "uploads": uploads, "gateway_rss_at_start_mb": start_rss, "worker_model": model_note}
    finally:
        if service is not None:
            service.stop()
        remove(tmp)


def to_markdown(results: dict[str, Any]) -> str:
    lines = [
        "## Gateway (benchmark 3)",
        "",
        ("`scsnet serve --no-worker` (gateway + embedded Redis) on 127.0.0.1; the load generator (asyncio + httpx, "
        "one process) runs on the same machine and takes CPU from the gateway (its CPU per request is shown). "
        "Closed loop: N keep-alive connections, each sending its next poll when the last is answered "
        f"({WARMUP_REQUESTS} warm-up requests, then {POLL_SECONDS:g} s, at most {POLL_MAX_REQUESTS} requests): "
        "the capacity, and latency = N / rate. Open loop: polls sent on a fixed schedule "
        f"for {POLL_SECONDS:g} s over {OPEN_CONNECTIONS} keep-alive connections, as many independent clients would, latency counted from "
        "each request's due time, waits for a free connection included (no coordinated omission): the goal check (>= 500/s with p99 < 50 ms). "
        "Latency is what the client saw; 'gateway <= 50 ms' is from the gateway's own histogram on `/metrics`. "
        "Succeeded jobs: 5 real-DWI jobs run to the end; queued jobs: 10 real-DWI jobs waiting (their view also "
        "counts the jobs ahead)."),
        "",
        "### Status polls: `GET /v1/jobs/{id}`",
        "",
        "| job state | request | load | requests/s | p50 (ms) | p99 (ms) | max (ms) | gateway <= 50 ms | gateway CPU/request (ms) | client CPU/request (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["polls"]:
        kind = "`If-None-Match` -> 304" if r["conditional"] else "full -> 200"
        lines.append(
            f"| {r['job_state']} | {kind} | {r['load']} | {r['per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.1f} | "
            f"{r['gateway_within_50ms_pct']:.1f}% | {r['gateway_cpu_ms_per_request']:.2f} | {r['client_cpu_ms_per_request']:.2f} |"
        )
    u = results["uploads"]
    statuses = ", ".join(f"{n} x {s}" for s, n in sorted(u["statuses"].items()))
    lines += [
        "",
        f"### {u['uploads']} parallel uploads of a {u['upload_bytes'] / 1e6:.1f} MB study",
        "",
        ("The real DWI centred in a 219x219 field of Rician noise (uncompressed NIfTI-1, int16, 15 slices x 35 volumes) "
        "with its gradient files: a valid study, streamed to disk, hashed, sniffed, gradient-checked, stored and queued. "
        "Gateway RSS sampled every 10 ms; the baseline is the median over the second before (after one warm-up upload)."),
        "",
        "| answers | SHA-256 intact | wall (s) | MiB/s (total) | per upload p50 / max (s) | gateway RSS at start (MiB) | baseline (MiB) | peak (MiB) | growth (MiB) | 1-2 s after (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        (f"| {statuses} | {u['intact']}/{u['uploads']} | {u['wall_s']:.2f} | {u['mb_per_s']:.0f} | {u['upload_s_p50']:.2f} / {u['upload_s_max']:.2f} | "
        f"{results['gateway_rss_at_start_mb']:.0f} | {u['rss_baseline_mb']:.0f} | {u['rss_peak_mb']:.0f} | {u['rss_growth_mb']:.1f} | {u['rss_after_mb']:.0f} |"),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(to_markdown(run()))
