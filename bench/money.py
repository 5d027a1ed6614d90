"""Usage, quotas and credits: what admission's reservations cost a submission, and what
the ledger costs in Redis memory."""

from __future__ import annotations

import asyncio
import statistics
import uuid
from typing import Any

import redis

from bench.common import Bench, cleanup, ingress_load

# Quotas of every kind, per day and month, high enough never to refuse: every submission
# reserves in two windows and is checked against six limits (and PRICE_FAKE prices it).
QUOTAS_ON = {
    "PRICE_FAKE": "0.27,1.10",
    **{
        f"QUOTA_FREE_{measure}_PER_{period}": "1000000000000"
        for measure in ("TASKS", "TOKENS", "USD")
        for period in ("DAY", "MONTH")
    },
}


def quota_ingress(bench: Bench) -> None:
    """(q) POST /v1/tasks with quotas on against off: six runs each, alternated (off, on,
    on, off ...) so that a machine slowing down weighs on both alike; medians compared."""
    print("ingress with quotas off / on: one process, 64 connections, 5 s each", flush=True)
    # One process: two (serve --workers 2) spread runs of one setting by up to 50 % here.
    store = redis.Redis.from_url(bench.redis_url)

    def redis_cpu_s() -> float:
        cpu: dict[str, Any] = store.info("cpu")  # type: ignore[assignment]
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    runs: dict[bool, list[tuple[float, float, float, float]]] = {False: [], True: []}
    for on in (False, True, True, False) * 3:
        before = redis_cpu_s()
        rate, _p50, p99, cpu_us, _tool = ingress_load(
            bench, 5, workers=1, **(QUOTAS_ON if on else {})
        )
        # Redis's CPU over the run (start-up and clean-up included) per submission.
        redis_us = (redis_cpu_s() - before) / (rate * 5) * 1e6
        runs[on].append((rate, p99, cpu_us, redis_us))
    store.close()
    medians = {}
    for on in (False, True):
        side = "on" if on else "off"
        rate, p99, cpu_us, redis_us = (statistics.median(r[i] for r in runs[on]) for i in range(4))
        medians[on] = rate
        every = ", ".join(f"{r[0]:,.0f}" for r in runs[on])
        bench.add("q", f"submissions/s, quotas {side} (median; runs)", f"{rate:,.0f}; {every}")
        bench.add("q", f"POST /v1/tasks p99, quotas {side} (median)", f"{p99:.2f} ms")
        bench.add("q", f"worker CPU per submission, quotas {side} (median)", f"{cpu_us:.0f} us")
        bench.add("q", f"Redis CPU per submission, quotas {side} (median)", f"{redis_us:.0f} us")
    bench.add("q", "submissions/s, on / off", f"{medians[True] / medians[False]:.3f}", ">= 0.90")


def ledger_memory(bench: Bench) -> None:
    """(r) Redis memory of the ledger: 10,000 tasks of 1,000 users, each finished."""
    print("ledger memory: 10,000 tasks of 1,000 users, one replica, no latency", flush=True)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        per_entry, per_user_day, per_user_month = asyncio.run(_ledger(bench, prefix, 10_000, 1000))
    finally:
        cleanup(bench, prefix)
    bench.add("r", "ledger entry (one per finished attempt)", f"{per_entry:.0f} B")
    bench.add("r", "daily totals per user (one tier and model)", f"{per_user_day:.0f} B")
    bench.add("r", "quota windows per user (a day and its month)", f"{per_user_month:.0f} B")


async def _entries(r: Any, key: str, n: int) -> None:
    """Until the ledger holds ``n`` entries (every task finished)."""
    for _ in range(3000):
        if await r.xlen(key) >= n:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the ledger did not reach {n} entries")


async def _ledger(bench: Bench, prefix: str, n: int, users: int) -> tuple[float, float, float]:
    from llmworker.logs import configure_logging
    from llmworker.record import TaskSpec
    from llmworker.settings import load_settings
    from llmworker.worker import Worker

    settings = load_settings(
        {
            "REDIS_URL": bench.redis_url,
            "REDIS_PREFIX": prefix,
            "LOG_LEVEL": "WARNING",
            "FAKE_LATENCY_MS": "0",
            "MAX_FAKE_FREE": "200",
            "MAX_USER_FREE": "50",
            "QUEUE_MAX_FREE": str(n),
            "PRICE_FAKE": "0.27,1.10",
            "QUOTA_FREE_TASKS_PER_DAY": str(n),
        },
        env_file=None,
    )
    configure_logging(settings)
    worker = Worker(settings)
    await worker.start()
    try:
        for start in range(0, n, 500):
            await asyncio.gather(
                *(
                    worker.admitter.submit(
                        TaskSpec.model_validate(
                            {"kind": "chat", "user": f"user-{i % users}",
                             "input": {"messages": [{"role": "user", "content": "hello"}]}}
                        )
                    )
                    for i in range(start, min(n, start + 500))
                )
            )  # fmt: skip
        r = worker.redis
        await _entries(r, worker.keys.base + "ledger", n)
        books = worker.queue.calendar.books()
        base = worker.keys.base
        ledger = await r.memory_usage(base + "ledger") or 0
        totals = await r.memory_usage(f"{base}ld:{books.day}") or 0
        windows = await r.memory_usage(f"{base}q:default/user-0:{books.month}") or 0
        return ledger / n, totals / users, float(windows)
    finally:
        await worker.stop()
