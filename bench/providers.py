"""Providers as they behave (``make bench``: ``hidden_capacity``, ``latency_growth``,
``route_outage`` and ``w1_all_on``), each against ``llmworker fake-llm`` playing one
provider's shape:

- (a) a provider that takes 12 concurrent calls and answers 429 above that, with MAX 50:
  adaptive caps against static 50 and static 12 (the oracle);
- (b) DeepSeek-like: past 8 calls in flight each more call holds every first token back
  by 250 ms: adaptive (latency) against static caps, p95 time to first token;
- (c) the first model of a route goes down mid-run: how soon tasks continue on the next
  one, and that none fails;
- (d) the W1 saturation with all of it on (adaptive caps, RPM/TPM windows, a route with
  a second model, spill-over) against all of it off, back to back.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import redis

from bench.common import (
    CHAT_INPUT,
    Bench,
    cleanup,
    free_port,
    percentile,
    settled,
    submit_all,
    wait_finished,
    wait_http,
    worker_env,
)
from llmworker.keys import Keys


@contextlib.contextmanager
def fake(bench: Bench, port: int, *args: str) -> Iterator[str]:
    command = [sys.executable, "-m", "llmworker", "fake-llm", "--port", str(port), *args]
    with bench.process(f"fake-llm-{port}", command, {}):
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/_fake/stats")
        httpx.post(f"{url}/_fake/config", json={"record": True})
        yield url


def records(bench: Bench, prefix: str, ids: list[str], *fields: str) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(bench.redis_url, decode_responses=True)
    keys = Keys(prefix)
    try:
        pipe = client.pipeline(transaction=False)
        for task_id in ids:
            pipe.hmget(keys.task(task_id), list(fields))
        return [dict(zip(fields, row, strict=True)) for row in pipe.execute()]
    finally:
        client.close()


def _bodies(n: int, model: str | list[str] | None = "m1", tier: str = "paid") -> list[Any]:
    out = []
    for i in range(n):
        body: dict[str, Any] = {"kind": "chat", "input": CHAT_INPUT, "tier": tier, "user": f"u{i}"}
        if model is not None:
            body["model"] = model
        out.append(body)
    return out


# -- (a) a hidden concurrency capacity ---------------------------------------------

CAPACITY, CONFIGURED, HIDDEN_TASKS, HIDDEN_LATENCY_MS = 12, 50, 1200, 300


def hidden_capacity(bench: Bench) -> None:
    print(
        f"hidden capacity: the provider takes {CAPACITY} calls, MAX {CONFIGURED}, "
        f"{HIDDEN_TASKS} tasks of {HIDDEN_LATENCY_MS} ms",
        flush=True,
    )
    runs: dict[str, dict[str, Any]] = {
        f"static {CONFIGURED}": {"ADAPTIVE_CAPS": "false", "MAX_M1_PAID": CONFIGURED},
        f"static {CAPACITY} (oracle)": {"ADAPTIVE_CAPS": "false", "MAX_M1_PAID": CAPACITY},
        "adaptive": {"MAX_M1_PAID": CONFIGURED},
    }
    measured = {name: _hidden_run(bench, env) for name, env in runs.items()}
    oracle = measured[f"static {CAPACITY} (oracle)"]
    for name, m in measured.items():
        bench.add(
            "a",
            f"{name}: tasks/s; 429s of all calls; after 10 s; failed",
            f"{m['rate']:.1f}; {m['share']:.1%}; {m['late_share']:.1%}; {m['failed']}",
        )
    adaptive = measured["adaptive"]
    bench.add(
        "a",
        "adaptive throughput / static 12's",
        f"{adaptive['rate'] / oracle['rate']:.3f}",
        ">= 0.90",
    )
    bench.add("a", "adaptive 429s after the first 10 s", f"{adaptive['late_share']:.2%}", "<= 2 %")
    bench.add(
        "a",
        "adaptive converged (its cap within 0.7x .. capacity + 2 from then on)",
        f"{adaptive['converged_s']:.1f} s",
        "<= 10 s",
    )


def _hidden_run(bench: Bench, extra: dict[str, Any]) -> dict[str, float]:
    """One run; its tasks/s, 429 shares (all, after 10 s), failures, convergence."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    fake_port, port = free_port(), free_port()
    env = worker_env(
        bench, prefix, fake_port, MAX_USER_PAID=10_000, QUEUE_MAX_PAID=100_000, **extra
    )
    samples: list[tuple[float, int, int, int | None]] = []
    try:
        with (
            fake(
                bench, fake_port, "--latency-ms", str(HIDDEN_LATENCY_MS), "--tokens", "5",
                "--capacity", str(CAPACITY),
            ) as fake_url,
            bench.serve(port, env),
        ):  # fmt: skip
            wait_http(f"http://127.0.0.1:{port}/ready")
            started = time.time()
            ids = asyncio.run(submit_all(f"http://127.0.0.1:{port}", _bodies(HIDDEN_TASKS), 16))
            client = redis.Redis.from_url(bench.redis_url, decode_responses=True)
            keys = Keys(prefix)
            with httpx.Client(base_url=fake_url) as control:
                while True:
                    stats = control.get("/_fake/stats").json()
                    caps = httpx.get(f"http://127.0.0.1:{port}/v1/stats").json()["adaptive_caps"]
                    samples.append(
                        (
                            time.time() - started,
                            stats["calls"].get("m1", 0),
                            stats["errors"].get("m1", 0),
                            caps["m1"]["cap"] if "m1" in caps else None,
                        )
                    )
                    if settled(client, keys):
                        break
                    time.sleep(0.5)
            client.close()
        rows = records(bench, prefix, ids, "status", "finished_at")
    finally:
        cleanup(bench, prefix)
    ended = max(int(r["finished_at"]) for r in rows) / 1000
    calls, errors = samples[-1][1], samples[-1][2]
    at10 = next((s for s in samples if s[0] >= 10), samples[-1])
    late_calls, late_errors = calls - at10[1], errors - at10[2]
    # Converged: from when on the cap stays between a cut below the capacity and two
    # above it (adaptive runs only).
    converged = float("nan")
    for i, sample in enumerate(samples):
        if all(c is not None and 0.7 * CAPACITY <= c <= CAPACITY + 2 for *_, c in samples[i:]):
            converged = sample[0]
            break
    return {
        "rate": len(rows) / (ended - started),
        "share": errors / calls if calls else 0.0,
        "late_share": late_errors / late_calls if late_calls else 0.0,
        "failed": sum(r["status"] != "succeeded" for r in rows),
        "converged_s": converged,
    }


# -- (b) latency that grows with load ------------------------------------------------

KNEE, LOAD_TTFT_MS, LATENCY_TASKS, CALL_MS, TOKENS, LATENCY_MAX = 8, 250, 300, 500, 20, 24
# The adaptive run is longer: its first seconds find the knee, the rest is steady.
ADAPTIVE_TASKS = 1200


def latency_growth(bench: Bench) -> None:
    print(
        f"latency growth: past {KNEE} calls each more adds {LOAD_TTFT_MS} ms to every first "
        f"token; {LATENCY_TASKS} tasks",
        flush=True,
    )
    unloaded = _latency_run(bench, {"ADAPTIVE_CAPS": "false", "MAX_M1_PAID": 1}, 20)
    bench.add("b", "unloaded time to first token p95", f"{unloaded['p95'] * 1000:.0f} ms")
    best_name, best = "", {"rate": 0.0}
    for cap in (4, 8, 12, 16, LATENCY_MAX):
        m = _latency_run(bench, {"ADAPTIVE_CAPS": "false", "MAX_M1_PAID": cap}, LATENCY_TASKS)
        bench.add(
            "b",
            f"static {cap}: tasks/s; TTFT p95",
            f"{m['rate']:.1f}; {m['p95'] * 1000:.0f} ms",
        )
        if m["rate"] > best["rate"]:
            best_name, best = f"static {cap}", m
    adaptive = _latency_run(
        bench, {"MAX_M1_PAID": LATENCY_MAX, "ADAPT_TO_LATENCY": "bench"}, ADAPTIVE_TASKS
    )
    bench.add(
        "b",
        f"adaptive (MAX {LATENCY_MAX}), {ADAPTIVE_TASKS} tasks: tasks/s; TTFT p95",
        f"{adaptive['rate']:.1f}; {adaptive['p95'] * 1000:.0f} ms",
    )
    bench.add(
        "b",
        "the same after its first 10 s: tasks/s; TTFT p95",
        f"{adaptive['late_rate']:.1f}; {adaptive['late_p95'] * 1000:.0f} ms",
    )
    bench.add(
        "b",
        "adaptive TTFT p95 / unloaded: whole run; after 10 s",
        f"{adaptive['p95'] / unloaded['p95']:.2f}; {adaptive['late_p95'] / unloaded['p95']:.2f}",
        "<= 2",
    )
    bench.add(
        "b",
        f"adaptive throughput / the best static ({best_name}): whole run; after 10 s",
        f"{adaptive['rate'] / best['rate']:.3f}; {adaptive['late_rate'] / best['rate']:.3f}",
        ">= 0.90",
    )


def _latency_run(bench: Bench, extra: dict[str, Any], n: int) -> dict[str, float]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    fake_port, port = free_port(), free_port()
    env = worker_env(
        bench, prefix, fake_port, MAX_USER_PAID=10_000, QUEUE_MAX_PAID=100_000, **extra
    )
    try:
        with (
            fake(
                bench, fake_port, "--latency-ms", str(CALL_MS), "--tokens", str(TOKENS),
                "--load-knee", str(KNEE), "--load-ttft-ms", str(LOAD_TTFT_MS),
                "--keepalive-s", "0.1",
            ) as fake_url,
            bench.serve(port, env),
        ):  # fmt: skip
            wait_http(f"http://127.0.0.1:{port}/ready")
            started = time.time()
            ids = asyncio.run(submit_all(f"http://127.0.0.1:{port}", _bodies(n), 16))
            rows = wait_finished(bench, prefix, ids, timeout_s=600)
            timeline = httpx.get(f"{fake_url}/_fake/timeline").json()
    finally:
        cleanup(bench, prefix)
    ended = max(int(r["finished_at"]) for r in rows) / 1000
    ttfts = [t[3] for t in timeline if t[3] is not None]
    late = [t[3] for t in timeline if t[3] is not None and t[0] >= started + 10] or ttfts
    settled = started + 10
    late_done = sum(1 for r in rows if int(r["finished_at"]) / 1000 >= settled)
    return {
        "rate": len(rows) / (ended - started),
        "p95": percentile(ttfts, 95),
        "late_p95": percentile(late, 95),
        "late_rate": late_done / (ended - settled) if ended > settled else float("nan"),
    }


# -- (c) the first model of a route goes down --------------------------------------

OUTAGE_RATE, OUTAGE_S, OUTAGE_AT_S = 20, 20, 6


def route_outage(bench: Bench) -> None:
    print(
        f"route outage: ROUTE_CHAT_PAID=m1,m2, {OUTAGE_RATE} tasks/s for {OUTAGE_S} s, "
        f"m1 down from {OUTAGE_AT_S} s",
        flush=True,
    )
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    fake_port, port = free_port(), free_port()
    env = worker_env(
        bench,
        prefix,
        fake_port,
        MODEL_M2="bench/m2",
        ROUTE_CHAT_PAID="m1,m2",
        MAX_M1_PAID=20,
        MAX_M2_PAID=20,
        MAX_USER_PAID=10_000,
        LOG_LEVEL="INFO",
    )
    try:
        with (
            fake(bench, fake_port, "--latency-ms", "300", "--tokens", "5") as fake_url,
            bench.serve(port, env),
        ):
            wait_http(f"http://127.0.0.1:{port}/ready")
            down_at, ids = asyncio.run(_steady(f"http://127.0.0.1:{port}", fake_url))
            rows = wait_finished(bench, prefix, ids, timeout_s=120)
        log = (bench.logs / f"serve-{port}.log").read_text()
        details = records(bench, prefix, ids, "model", "started_at", "status", "tried")
    finally:
        cleanup(bench, prefix)
    opened = [
        orjson.loads(line)
        for line in log.splitlines()
        if '"circuit_opened"' in line and line.startswith("{")
    ]
    opened_at = _epoch(opened[0]["timestamp"]) if opened else float("nan")
    after = sorted(
        int(d["started_at"]) / 1000 for d in details if d["model"] == "m2" and d["started_at"]
    )
    first_on_m2 = next((t for t in after if t >= down_at), float("nan"))
    moved = sum(1 for d in details if len(orjson.loads(d["tried"] or "[]")) > 1)
    bench.add(
        "c",
        "tasks; failed",
        f"{len(rows)}; {sum(r['status'] != 'succeeded' for r in rows)}",
        "0 failed",
    )
    bench.add("c", "outage -> circuit opened", f"{(opened_at - down_at) * 1000:.0f} ms")
    bench.add(
        "c",
        "circuit opened -> tasks continue on m2",
        f"{(first_on_m2 - opened_at) * 1000:.0f} ms",
        "<= 1 s",
    )
    bench.add("c", "tasks that went through more than one model", str(moved))


async def _steady(url: str, fake_url: str) -> tuple[float, list[str]]:
    """Submit OUTAGE_RATE tasks a second for OUTAGE_S; m1 goes down at OUTAGE_AT_S."""
    ids: list[str] = []
    down_at = 0.0
    async with httpx.AsyncClient(timeout=10) as client:
        started = time.monotonic()
        for second in range(OUTAGE_S):
            if second == OUTAGE_AT_S:
                down_at = time.time()
                await client.post(f"{fake_url}/_fake/config", json={"down": ["m1"]})
            ids += await submit_all(url, _bodies(OUTAGE_RATE, None), 4)
            await asyncio.sleep(max(0.0, started + second + 1 - time.monotonic()))
    return down_at, ids


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


# -- (d) W1 with all of it on ------------------------------------------------------

ALL_ON = {
    "MODEL_M2": "bench/m2",
    "RPM_M1": 1_000_000,
    "TPM_M1": 1_000_000_000,
    "ROUTE_CHAT_PAID": "m1,m2",
    "MAX_M2_PAID": 20,
    "SPILL_AFTER_S": 3600,
}
ALL_OFF = {"ADAPTIVE_CAPS": "false"}


def w1_all_on(bench: Bench) -> None:
    from bench.run import saturation_run

    print("W1 with all of it on / off: 2 replicas, cap 20, 100 ms, 2,000 tasks", flush=True)
    results: dict[bool, list[float]] = {False: [], True: []}
    for on in (False, True, True, False):
        utilisation = saturation_run(bench, ALL_ON if on else ALL_OFF, model=None if on else "m1")
        results[on].append(utilisation)
    for on in (False, True):
        runs = ", ".join(f"{u:.3f}" for u in results[on])
        bench.add("d", f"W1 utilisation, all {'on' if on else 'off'} (runs)", runs)
    ratio = statistics.mean(results[True]) / statistics.mean(results[False])
    bench.add("d", "W1 utilisation, on / off", f"{ratio:.3f}", ">= 0.97 (noise)")
