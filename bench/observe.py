"""The cost of seeing (``make bench``, scenarios ``metrics_cost`` and ``scrape``):

- the no-op rate and submissions/s with metrics on against metrics off
  (``METRICS_ENABLED``), measured back to back, alternating, three runs each;
- how long ``GET /metrics`` takes with 100 tier x model series and 100,000 waiting tasks.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from bench.common import (
    Bench,
    cleanup,
    drain,
    free_port,
    ingress_load,
    percentile,
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


def _order() -> list[bool]:
    """Metrics off and on, ROUNDS times each, in the order off, on, on, off, off, on ..."""
    return [(i % 2 == 1) != (i // 2 % 2 == 1) for i in range(2 * ROUNDS)]


def _ratio(on: list[float], off: list[float]) -> str:
    return f"{statistics.median(on) / statistics.median(off):.3f}"


def _compare(
    bench: Bench, what: str, unit: str, measure: Callable[[bool], tuple[float, float]]
) -> None:
    """``measure(metrics)`` -> (rate, CPU us per item), ROUNDS times each way, alternating."""
    rates: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    for metrics in _order():
        rate, us = measure(metrics)
        rates[metrics].append(rate)
        cpu[metrics].append(us)
    for metrics in (False, True):
        runs = ", ".join(f"{r:,.0f}" for r in rates[metrics])
        bench.add("f", f"{what}, metrics {'on' if metrics else 'off'} (runs)", runs)
    bench.add("f", f"{what}, on / off (medians)", _ratio(rates[True], rates[False]), ">= 0.95")
    bench.add("f", f"worker CPU per {unit}, on / off (medians)", _ratio(cpu[True], cpu[False]))
    bench.add(
        "f",
        f"worker CPU per {unit}, metrics off (median)",
        f"{statistics.median(cpu[False]):.0f} us",
    )


def _calls_per_task_us() -> float:
    """What the metrics calls of one chat task cost, timed alone (admission, start,
    one provider call, the end)."""
    from llmworker.observe.metrics import Metrics
    from llmworker.providers import CallReport

    metrics, n = Metrics(), 100_000
    usage = {"prompt_tokens": 12, "completion_tokens": 400}
    call = CallReport("fake", "fake", "fake", "ok", 0.2, 0.05, "", usage)
    started = time.process_time()
    for _ in range(n):
        metrics.submitted("free", "fake", "api")
        metrics.started("free", "fake", 0.004)
        metrics.provider_call(call)
        metrics.finished("free", "fake", "succeeded", 0.21)
    return (time.process_time() - started) / n * 1e6


def metrics_cost(bench: Bench) -> None:
    print(
        f"metrics cost: no-op rate ({NOOP_TASKS:,} tasks) and submissions/s ({INGRESS_S} s, "
        f"one process), metrics off and on, {ROUNDS} rounds each",
        flush=True,
    )

    def noop(metrics: bool) -> tuple[float, float]:
        return drain(bench, NOOP_TASKS, METRICS_ENABLED=str(metrics).lower())

    def ingress(metrics: bool) -> tuple[float, float]:
        rate, _, _, us, _ = ingress_load(bench, INGRESS_S, METRICS_ENABLED=str(metrics).lower())
        return rate, us

    _compare(bench, "no-op tasks/s", "task", noop)
    _compare(bench, "submissions/s", "submission", ingress)
    bench.add("f", "the metrics calls of one task, timed alone", f"{_calls_per_task_us():.1f} us")


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
    from llmworker.quotas import Calendar, terms
    from llmworker.record import new_task_id

    client = connect(bench.redis_url)
    queue = Queue(client, Keys(prefix))
    await queue.scripts.load()
    lanes = [(t, m) for t in TIERS for m in MODELS]
    no_quota = terms(Calendar().books(), {}, 0, 0, (0.0, 0.0))

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
                    terms=no_quota,
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
