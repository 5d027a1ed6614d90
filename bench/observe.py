"""The cost of seeing (``make bench``, scenarios ``metrics_cost`` and ``scrape``):

- the no-op rate and submissions/s with metrics on against metrics off
  (``METRICS_ENABLED``), measured back to back, alternating, three runs each;
- how long ``GET /metrics`` takes with 100 tier x model series and 100,000 waiting tasks.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import time
import uuid
from typing import Any

import httpx
import psutil

from bench.common import (
    Bench,
    _ids,
    _prefill,
    _python_load,
    _wrk,
    cleanup,
    free_port,
    percentile,
    wait_finished,
    wait_http,
    worker_env,
)

# Rounds alternate the order (off, on / on, off ...): a machine that slows down over the
# run penalises both sides alike.
ROUNDS = 6
NOOP_TASKS = 10_000
INGRESS_S = 5
TIERS = [f"t{i}" for i in range(10)]
MODELS = [f"m{i}" for i in range(10)]
WAITING = 100_000


def _noop(bench: Bench, metrics: bool) -> tuple[float, float]:
    """Tasks/s and CPU us per task of one process draining a pre-filled queue."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = worker_env(
        bench,
        prefix,
        None,
        FAKE_LATENCY_MS=0,
        FAKE_TOKENS=0,
        MAX_FAKE_FREE=100_000,
        MAX_USER_FREE=100_000,
        QUEUE_MAX_FREE=1_000_000,
        METRICS_ENABLED=str(metrics).lower(),
    )
    try:
        asyncio.run(_prefill(bench, prefix, env, NOOP_TASKS))
        with bench.serve(port, env) as proc:
            wait_http(f"http://127.0.0.1:{port}/ready")
            ids = asyncio.run(_ids(bench, prefix))
            rows = wait_finished(bench, prefix, ids, timeout_s=300)
            cpu = psutil.Process(proc.pid).cpu_times()
        first = min(int(r["started_at"]) for r in rows) / 1000
        last = max(int(r["finished_at"]) for r in rows) / 1000
        return NOOP_TASKS / (last - first), (cpu.user + cpu.system) / NOOP_TASKS * 1e6
    finally:
        cleanup(bench, prefix)


def _cpu_s(proc: psutil.Process) -> float:
    """CPU seconds of a process and its children (the worker processes of --workers)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        times = p.cpu_times()
        total += times.user + times.system
    return total


def _ingress(bench: Bench, metrics: bool) -> tuple[float, float]:
    """Submissions/s into `serve --workers 2` (tasks wait: the model is busy), and the
    worker's CPU us per submission."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = worker_env(
        bench,
        prefix,
        None,
        FAKE_LATENCY_MS=60_000,
        MAX_FAKE_FREE=1,
        MAX_USER_FREE=1,
        QUEUE_MAX_FREE=10_000_000,
        METRICS_ENABLED=str(metrics).lower(),
        # The one running task goes back to the queue at once when the run ends.
        SHUTDOWN_GRACE_S=0,
    )
    try:
        with bench.serve(port, env, workers=2) as proc:
            wait_http(f"http://127.0.0.1:{port}/ready")
            url = f"http://127.0.0.1:{port}/v1/tasks"
            server = psutil.Process(proc.pid)
            before = _cpu_s(server)
            if shutil.which("wrk"):
                rate, _, _ = _wrk(bench, url, INGRESS_S)
            else:
                rate, _, _ = asyncio.run(_python_load(url, 64, INGRESS_S))
            used = _cpu_s(server) - before
        return rate, used / (rate * INGRESS_S) * 1e6
    finally:
        cleanup(bench, prefix)


def _order() -> list[bool]:
    """Metrics off and on, ROUNDS times each, in the order off, on, on, off, off, on ..."""
    return [(i % 2 == 1) != (i // 2 % 2 == 1) for i in range(2 * ROUNDS)]


def _ratio(on: list[float], off: list[float]) -> str:
    return f"{statistics.median(on) / statistics.median(off):.3f}"


def metrics_cost(bench: Bench) -> None:
    print(
        f"metrics cost: no-op rate ({NOOP_TASKS:,} tasks) and submissions/s ({INGRESS_S} s), "
        f"metrics off then on, {ROUNDS} rounds",
        flush=True,
    )
    rates: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    for metrics in _order():
        rate, us = _noop(bench, metrics)
        rates[metrics].append(rate)
        cpu[metrics].append(us)
    for metrics in (False, True):
        runs = ", ".join(f"{r:,.0f}" for r in rates[metrics])
        state = "on" if metrics else "off"
        bench.add("f", f"no-op tasks/s, metrics {state} (runs)", runs)
    bench.add("f", "no-op rate, on / off (medians)", _ratio(rates[True], rates[False]), ">= 0.95")
    bench.add("f", "worker CPU per task, on / off (medians)", _ratio(cpu[True], cpu[False]))
    ingress: dict[bool, list[float]] = {False: [], True: []}
    ingress_cpu: dict[bool, list[float]] = {False: [], True: []}
    for metrics in _order():
        rate, us = _ingress(bench, metrics)
        ingress[metrics].append(rate)
        ingress_cpu[metrics].append(us)
    for metrics in (False, True):
        runs = ", ".join(f"{r:,.0f}" for r in ingress[metrics])
        bench.add("f", f"submissions/s, metrics {'on' if metrics else 'off'} (runs)", runs)
    bench.add(
        "f", "submissions/s, on / off (medians)", _ratio(ingress[True], ingress[False]), ">= 0.95"
    )
    bench.add(
        "f",
        "worker CPU per submission, on / off (medians)",
        _ratio(ingress_cpu[True], ingress_cpu[False]),
    )


def _deployment_env(bench: Bench, prefix: str) -> dict[str, str]:
    extra: dict[str, Any] = {
        "BENCH_BASE_URL": "http://127.0.0.1:9/v1",
        "TIERS": ",".join(TIERS),
        "DEFAULT_TIER": TIERS[0],
    }
    for model in MODELS:
        extra[f"MODEL_{model.upper()}"] = f"bench/{model}"
        for tier in TIERS:
            extra[f"MAX_{model.upper()}_{tier.upper()}"] = 2
    for tier in TIERS:
        extra[f"QUEUE_MAX_{tier.upper()}"] = 1_000_000
        extra[f"MAX_USER_{tier.upper()}"] = 2
    return worker_env(bench, prefix, None, **extra)


async def _fill_lanes(bench: Bench, prefix: str, env: dict[str, str]) -> None:
    """WAITING tasks over every tier and model, of a kind no replica runs (so they wait)."""
    from llmworker.connection import connect
    from llmworker.keys import Keys
    from llmworker.queue import Queue
    from llmworker.record import new_task_id

    client = connect(bench.redis_url)
    queue = Queue(client, Keys(prefix))
    await queue.scripts.load()
    lanes = [(t, m) for t in TIERS for m in MODELS]

    async def batch(start: int) -> None:
        calls = []
        for i in range(start, min(WAITING, start + 1000)):
            tier, model = lanes[i % len(lanes)]
            calls.append(
                queue.admit(
                    task_id=new_task_id(),
                    idempotency_key="",
                    kind="bench-idle",
                    tier=tier,
                    model=model,
                    user=f"default/user-{i % 1000}",
                    cap=1_000_000,
                    lane_limit=2,
                    fields={"input": "{}"},
                )
            )
        await asyncio.gather(*calls)

    for start in range(0, WAITING, 1000):
        await batch(start)
    await client.aclose()


def scrape(bench: Bench) -> None:
    print(
        f"scrape: GET /metrics with {len(TIERS) * len(MODELS)} tier x model series and "
        f"{WAITING:,} waiting tasks",
        flush=True,
    )
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = _deployment_env(bench, prefix)
    try:
        started = time.monotonic()
        asyncio.run(_fill_lanes(bench, prefix, env))
        bench.add(
            "g", "queued tasks (filled in)", f"{WAITING:,} in {time.monotonic() - started:.1f} s"
        )
        with bench.serve(port, env):
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/ready")
            times: list[float] = []
            with httpx.Client(base_url=base, timeout=10) as http:
                text = http.get("/metrics").text
                for _ in range(100):
                    t0 = time.perf_counter()
                    r = http.get("/metrics")
                    times.append((time.perf_counter() - t0) * 1000)
                    r.raise_for_status()
                stats_ms = []
                for _ in range(20):
                    t0 = time.perf_counter()
                    http.get("/v1/stats").raise_for_status()
                    stats_ms.append((time.perf_counter() - t0) * 1000)
        waiting = [
            line
            for line in text.splitlines()
            if line.startswith("llmworker_queue_waiting{") and 'model="fake"' not in line
        ]
        total = sum(float(line.rsplit(" ", 1)[1]) for line in waiting)
        if total != WAITING or len(waiting) != len(TIERS) * len(MODELS):
            raise RuntimeError(f"the scrape shows {total:,.0f} waiting in {len(waiting)} series")
        bench.add("g", "llmworker_queue_waiting series", f"{len(waiting)}")
        bench.add("g", "scrape size", f"{len(text.encode()) / 1024:,.0f} KiB")
        bench.add("g", "GET /metrics p50", f"{percentile(times, 50):.1f} ms")
        bench.add("g", "GET /metrics p99", f"{percentile(times, 99):.1f} ms", "<= 50 ms")
        bench.add("g", "GET /v1/stats p50", f"{percentile(stats_ms, 50):.1f} ms")
    finally:
        cleanup(bench, prefix)
