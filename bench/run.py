"""``make bench``: llmworker's throughput, latency and memory, measured on this machine.

Every scenario runs real processes on loopback: ``llmworker serve`` replicas, the
``llmworker fake-llm`` provider, and a Redis (``BENCH_REDIS_URL``, else the one on
127.0.0.1:6379, else the embedded one). Figures are printed as a Markdown table and
written to ``bench/results.md``. Machines are shared and noisy: compare figures from one
run, not across runs.

    python -m bench.run                 # every scenario
    python -m bench.run saturation rss  # some of them
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import redis

from bench import footprint, money, observe, providers, streams
from bench.common import (
    CHAT_INPUT,
    ROOT,
    Bench,
    RawHTTP,
    cleanup,
    drain,
    free_port,
    ingress_load,
    percentile,
    submit_all,
    wait_finished,
    wait_http,
    worker_env,
)
from llmworker.embedded import redis_server_binary

RESULTS = ROOT / "bench" / "results.md"


# -- scenarios ---------------------------------------------------------------------


def saturation(bench: Bench) -> None:
    """(a) 2 replicas, cap 20, provider latency 100 ms, 2,000 tasks from 64 clients;
    (b) pickup latency after a freed slot, from the provider's timeline."""
    print("saturation: 2 replicas, cap 20, 100 ms provider, 2,000 tasks, 64 clients", flush=True)
    saturation_run(bench, report=True)


def saturation_run(
    bench: Bench,
    extra: dict[str, Any] | None = None,
    model: str | None = "m1",
    report: bool = False,
) -> float:
    """One W1 saturation run; its utilisation (figures added when ``report``)."""
    n, cap, latency_s = 2000, 20, 0.100
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    fake_port, ports = free_port(), [free_port(), free_port()]
    env = worker_env(
        bench,
        prefix,
        fake_port,
        MAX_M1_PAID=cap,
        MAX_USER_PAID=10_000,
        QUEUE_MAX_PAID=100_000,
        **(extra or {}),
    )
    fake_url = f"http://127.0.0.1:{fake_port}"
    try:
        with (
            bench.fake_llm(fake_port, latency_s * 1000, 5),
            bench.serve(ports[0], env),
            bench.serve(ports[1], env),
        ):
            wait_http(f"{fake_url}/_fake/stats")
            for port in ports:
                wait_http(f"http://127.0.0.1:{port}/ready")
            httpx.post(f"{fake_url}/_fake/config", json={"record": True})
            bodies = [
                {
                    "kind": "chat",
                    "input": CHAT_INPUT,
                    "tier": "paid",
                    "user": f"u{i % 50}",
                    **({"model": model} if model else {}),
                }
                for i in range(n)
            ]
            first_submit = time.time()
            # 64 clients, half to each replica.
            half = n // 2

            async def both() -> list[str]:
                a, b = await asyncio.gather(
                    submit_all(f"http://127.0.0.1:{ports[0]}", bodies[:half], 32),
                    submit_all(f"http://127.0.0.1:{ports[1]}", bodies[half:], 32),
                )
                return a + b

            ids = asyncio.run(both())
            submitted = time.time()
            rows = wait_finished(bench, prefix, ids, timeout_s=120)
            stats = httpx.get(f"{fake_url}/_fake/stats").json()
            timeline = httpx.get(f"{fake_url}/_fake/timeline").json()
        last_finish = max(int(r["finished_at"]) for r in rows) / 1000
        makespan = last_finish - first_submit
        ideal = n * latency_s / cap
        if not report:
            return ideal / makespan
        bench.add("a", "tasks", f"{n} submitted in {submitted - first_submit:.2f} s")
        bench.add("a", "makespan", f"{makespan:.2f} s (ideal {ideal:.1f} s)")
        bench.add("a", "utilisation", f"{ideal / makespan:.3f}", ">= 0.99")
        bench.add("a", "overshoot", str(stats["max_inflight"].get("m1", 0) - cap), "0")
        durations = [(t[1] - t[0]) * 1000 for t in timeline]
        bench.add(
            "a",
            "provider call as the provider timed it, mean",
            f"{sum(durations) / len(durations):.1f} ms",
        )
        starts = sorted(t[0] for t in timeline)
        ends = sorted(t[1] for t in timeline)
        gaps = [
            (starts[cap + k] - ends[k]) * 1000
            for k in range(len(starts) - cap)
            if starts[cap + k] >= ends[k]
        ]
        bench.add("b", "pickup after a freed slot p50", f"{percentile(gaps, 50):.2f} ms")
        bench.add("b", "pickup after a freed slot p99", f"{percentile(gaps, 99):.2f} ms", "<= 2 ms")
        # The same from the worker's own records (Redis clock, 1 ms resolution): the gap
        # between a run's end and the next claim, without the provider's side.
        done = sorted(int(r["finished_at"]) for r in rows)
        begun = sorted(int(r["started_at"]) for r in rows)
        claims = [
            begun[cap + k] - done[k] for k in range(len(begun) - cap) if begun[cap + k] >= done[k]
        ]
        bench.add(
            "b",
            "finish -> next claim p50 / p99 (worker records)",
            f"{percentile(claims, 50):.0f} / {percentile(claims, 99):.0f} ms",
        )
    finally:
        cleanup(bench, prefix)
    return ideal / makespan


def idle_pickup(bench: Bench) -> None:
    """(b) a new task on an idle worker: from sending POST /v1/tasks to the provider call."""
    print("idle pickup: 1 replica, 300 tasks one at a time", flush=True)
    n = 300
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    fake_port, port = free_port(), free_port()
    env = worker_env(bench, prefix, fake_port, MAX_M1_FREE=10, MAX_USER_FREE=10)
    fake_url = f"http://127.0.0.1:{fake_port}"
    try:
        with bench.fake_llm(fake_port, 1, 1), bench.serve(port, env):
            wait_http(f"{fake_url}/_fake/stats")
            wait_http(f"http://127.0.0.1:{port}/ready")
            httpx.post(f"{fake_url}/_fake/config", json={"record": True})
            body = orjson.dumps({"kind": "chat", "input": CHAT_INPUT, "model": "m1"})
            sent = asyncio.run(_one_at_a_time(port, body, n))
            timeline = httpx.get(f"{fake_url}/_fake/timeline").json()
        starts = sorted(t[0] for t in timeline)
        gaps = [(s - t) * 1000 for s, t in zip(starts, sent, strict=True)]
        bench.add(
            "b", "submit -> provider call on an idle worker p50", f"{percentile(gaps, 50):.2f} ms"
        )
        bench.add(
            "b", "submit -> provider call on an idle worker p99", f"{percentile(gaps, 99):.2f} ms"
        )
    finally:
        cleanup(bench, prefix)


async def _one_at_a_time(port: int, body: bytes, n: int) -> list[float]:
    """Submit ``n`` tasks, each after the last has long finished; when each was sent."""
    conn = RawHTTP("127.0.0.1", port)
    sent = []
    try:
        for _ in range(n):
            sent.append(time.time())
            status, answer = await conn.post("/v1/tasks", body)
            if status != 202:
                raise RuntimeError(f"submission got {status}: {answer!r}")
            await asyncio.sleep(0.03)  # the 1 ms call ends; the worker is idle again
    finally:
        conn.close()
    return sent


def noop_rate(bench: Bench) -> None:
    """(c) tasks/s of one process with a zero-latency model, from a pre-filled queue."""
    print(
        "no-op rate: 1 replica, 20,000 queued tasks, in-process model with no latency", flush=True
    )
    rate, cpu_us = drain(bench, 20_000)
    bench.add("c", "no-op tasks/s, one process", f"{rate:,.0f}", ">= 5,000")
    bench.add("c", "worker CPU per task", f"{cpu_us:,.0f} us")


def ingress(bench: Bench) -> None:
    """(d) POST /v1/tasks throughput and latency, `serve --workers 2`, 64 connections."""
    print("ingress: serve --workers 2, 64 connections, 10 s", flush=True)
    rate, p50, p99, _, tool = ingress_load(bench, 10, workers=2)
    bench.add("d", "load generator", tool)
    bench.add("d", "submissions/s", f"{rate:,.0f}", ">= 5,000")
    bench.add("d", "POST /v1/tasks p50", f"{p50:.2f} ms")
    bench.add("d", "POST /v1/tasks p99", f"{p99:.2f} ms", "<= 20 ms")


def rss(bench: Bench) -> None:
    """(e) resident memory of one replica holding 1,000 streaming tasks in flight."""
    print("memory: 1 replica, 1,000 streaming tasks in flight", flush=True)
    n = 1000
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    fake_port, port = free_port(), free_port()
    env = worker_env(bench, prefix, fake_port, MAX_M1_FREE=n, MAX_USER_FREE=n, QUEUE_MAX_FREE=n)
    fake_url = f"http://127.0.0.1:{fake_port}"
    try:
        with bench.fake_llm(fake_port, 30_000, 30), bench.serve(port, env) as proc:
            wait_http(f"{fake_url}/_fake/stats")
            wait_http(f"http://127.0.0.1:{port}/ready")
            idle = psutil.Process(proc.pid).memory_info().rss
            bodies = [
                {"kind": "chat", "input": CHAT_INPUT, "model": "m1", "user": f"u{i}"}
                for i in range(n)
            ]
            asyncio.run(submit_all(f"http://127.0.0.1:{port}", bodies, 32))
            deadline = time.monotonic() + 60
            while httpx.get(f"{fake_url}/_fake/stats").json()["inflight"].get("m1", 0) < n:
                if time.monotonic() > deadline:
                    raise RuntimeError("the tasks did not all reach the provider")
                time.sleep(0.1)
            peak = 0
            for _ in range(20):  # tokens are streaming meanwhile
                peak = max(peak, psutil.Process(proc.pid).memory_info().rss)
                time.sleep(0.25)
        bench.add("e", "RSS idle", f"{idle / 2**20:.0f} MB")
        bench.add("e", "RSS with 1,000 streaming tasks", f"{peak / 2**20:.0f} MB", "<= 100 MB")
    finally:
        cleanup(bench, prefix)


def transport(bench: Bench) -> None:
    """What one provider call costs the worker: the official SDK's path and llmworker's
    own client (each as llmworker calls it) against the same streamed request on bare
    aiohttp. Each is measured in a process of its own, so memory freed by one cannot
    hide another's."""
    print("transport: 300 sequential calls, then 1,000 open streams, each way", flush=True)
    port = free_port()
    with bench.fake_llm(port, 1, 5):
        wait_http(f"http://127.0.0.1:{port}/_fake/stats")
        for name in ("sdk", "direct", "aiohttp"):
            code = f"import asyncio, bench.run as b; print(asyncio.run(b._transport_cost({port}, {name!r})))"
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
            )
            cpu_ms, kb = (float(x) for x in out.stdout.strip().strip("()").split(","))
            label = {
                "sdk": "openai SDK",
                "direct": "llmworker's client",
                "aiohttp": "bare aiohttp",
            }[name]
            bench.add(
                "t",
                f"{label}: CPU per streamed call / memory per open stream",
                f"{cpu_ms:.2f} ms / {kb:.0f} KB",
            )


async def _transport_cost(port: int, name: str) -> tuple[float, float]:
    import aiohttp

    from llmworker.providers import Providers
    from llmworker.settings import load_settings

    base = f"http://127.0.0.1:{port}/v1"
    env = {"BENCH_BASE_URL": base, "MODEL_M1": "bench/m1"}
    env["PROVIDER_CLIENT"] = "openai" if name == "sdk" else "direct"
    providers = Providers(load_settings(env, env_file=None))
    client = providers.client("m1")
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    messages = [{"role": "user", "content": "hi"}]
    body = {
        "model": "m1",
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def bare() -> None:
        async with session.post(f"{base}/chat/completions", json=body) as response:
            async for _ in response.content:
                pass

    async def through_client() -> None:
        await client.chat(messages)

    call = bare if name == "aiohttp" else through_client
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as control:
        for _ in range(20):  # warm up connections and caches
            await call()
        started = time.process_time()
        for _ in range(300):
            await call()
        cpu_ms = (time.process_time() - started) / 300 * 1000
        await control.post("/_fake/config", json={"latency_ms": 20_000})
        before = psutil.Process().memory_info().rss
        calls = [asyncio.create_task(call()) for _ in range(1000)]
        await asyncio.sleep(5)
        grown = psutil.Process().memory_info().rss - before
        for task in calls:
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await control.post("/_fake/config", json={"latency_ms": 1})
    await session.close()
    await providers.aclose()
    return cpu_ms, grown / 1000 / 1024


SCENARIOS: dict[str, Callable[[Bench], None]] = {
    "saturation": saturation,
    "idle_pickup": idle_pickup,
    "noop": noop_rate,
    "ingress": ingress,
    "quota_ingress": money.quota_ingress,
    "ledger_memory": money.ledger_memory,
    "footprint": footprint.footprint,
    "streams": streams.streams,
    "rss": rss,
    "transport": transport,
    "metrics_cost": observe.metrics_cost,
    "scrape": observe.scrape,
    "hidden_capacity": providers.hidden_capacity,
    "latency_growth": providers.latency_growth,
    "route_outage": providers.route_outage,
    "w1_all_on": providers.w1_all_on,
}


def _redis_url() -> tuple[str, subprocess.Popen[bytes] | None]:
    url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    with contextlib.suppress(redis.RedisError):
        if redis.Redis.from_url(url, socket_timeout=1).ping():
            return url, None
    port = free_port()
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(200):
        with contextlib.suppress(redis.RedisError):
            if redis.Redis.from_url(url).ping():
                return url, proc
        time.sleep(0.05)
    raise RuntimeError("no Redis for the benchmark")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "scenarios", nargs="*", help=f"some of: {', '.join(SCENARIOS)} (default: all)"
    )
    args = parser.parse_args(argv)
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    url, own_redis = _redis_url()
    with tempfile.TemporaryDirectory(prefix="llmworker-bench-") as tmp:
        bench = Bench(url, Path(tmp))
        try:
            for name in args.scenarios or SCENARIOS:
                SCENARIOS[name](bench)
        finally:
            if own_redis is not None:
                own_redis.terminate()
    _write(bench)
    return 0


def _write(bench: Bench) -> None:
    cpu = f"{os.cpu_count()} cores, {platform_line()}"
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {cpu}; `make bench` reproduces it.",
        "",
        "| scenario | metric | value | target |",
        "|---|---|---|---|",
    ]
    lines += [f"| {f.scenario} | {f.metric} | {f.value} | {f.target} |" for f in bench.figures]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


def platform_line() -> str:
    import platform

    return f"Python {platform.python_version()}, {platform.machine()}"


if __name__ == "__main__":
    raise SystemExit(main())
