"""Streams at scale: what relaying streamed answers costs one replica, with and without a
Server-Sent Events reader per task, against a bare client reading the same streams from
the provider; how long a provider's chunk takes to reach the reader; and the Redis
connections a thousand readers hold.

The provider is ``llmworker fake-llm --stamp``: each piece of an answer is its send time,
so a reader times each piece's way through the replica and Redis. CPU is the replica
process's own (user + system), read from the OS before and after each round; the
readers run in this process and are not counted.

    python -m bench.run streams
    python -m bench.streams bare <base_url> <streams>   # the bare client, alone
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from urllib.parse import urlparse

import aiohttp
import httpx
import orjson
import psutil

from bench.common import (
    Bench,
    cleanup,
    cpu_s,
    free_port,
    percentile,
    submit_all,
    wait_http,
    worker_env,
)

STREAMS = 200
TOKENS = 400
ANSWER_S = 8.0  # 200 answers of 400 tokens in 8 s: 10,000 tokens/s through one replica
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


def streams(bench: Bench) -> None:
    """(s) relay CPU per 1,000 tokens with no reader, a reader per task, five per task;
    a bare client's; chunk -> SSE latency; Redis connections held by 1,000 readers."""
    print(
        f"streams: {STREAMS} answers of {TOKENS} tokens in {ANSWER_S:g} s on one replica",
        flush=True,
    )
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    fake_port, port = free_port(), free_port()
    env = worker_env(
        bench,
        prefix,
        fake_port,
        MAX_M1_FREE=5 * STREAMS,
        MAX_USER_FREE=5 * STREAMS,
        QUEUE_MAX_FREE=100_000,
    )
    fake_url = f"http://127.0.0.1:{fake_port}"
    url = f"http://127.0.0.1:{port}"
    fake_args = [sys.executable, "-m", "llmworker", "fake-llm", "--port", str(fake_port)]
    fake_args += ["--latency-ms", str(ANSWER_S * 1000), "--tokens", str(TOKENS), "--stamp"]
    results: dict[str, list[float]] = {}
    latencies: dict[str, list[float]] = {"r1": [], "slow": []}
    connections: list[int] = []
    redis_port = urlparse(bench.redis_url).port or 6379
    # The same with TOKEN_FLUSH_MS=100: five tokens an event at this pace.
    # Its own prefix: the two replicas must not share (and split) the rounds' tasks.
    slow_port, slow_prefix = free_port(), f"bench-{uuid.uuid4().hex[:8]}"
    slow_env = {**env, "REDIS_PREFIX": slow_prefix, "TOKEN_FLUSH_MS": "100"}
    try:
        with (
            bench.process("fake-llm-stamped", fake_args, {}),
            bench.serve(port, env) as replica,
            bench.serve(slow_port, slow_env) as slow_replica,
        ):
            wait_http(f"{fake_url}/_fake/stats")
            wait_http(f"{url}/ready")
            wait_http(f"http://127.0.0.1:{slow_port}/ready")
            proc = psutil.Process(replica.pid)
            slow = psutil.Process(slow_replica.pid)
            # Alternated, twice: a machine that slows down over the run weighs on all.
            for _ in range(2):
                results.setdefault("bare", []).append(_bare(fake_url))
                for readers in (0, 1, 5):
                    cpu, lat, conns = asyncio.run(_round(url, proc, redis_port, readers))
                    results.setdefault(f"r{readers}", []).append(cpu)
                    if readers == 1:
                        latencies["r1"] += lat
                    if readers == 5:
                        connections.append(conns)
                slow_url = f"http://127.0.0.1:{slow_port}"
                cpu, lat, _conns = asyncio.run(_round(slow_url, slow, redis_port, 1))
                results.setdefault("slow", []).append(cpu)
                latencies["slow"] += lat
    finally:
        cleanup(bench, prefix)
        cleanup(bench, slow_prefix)
    bare = min(results["bare"])
    for name, label in (
        ("bare", "a bare aiohttp client reading the provider's streams"),
        ("r0", "the replica relaying, nobody reading"),
        ("r1", "the replica relaying, an SSE reader per task"),
        ("r5", "the replica relaying, five SSE readers per task (1,000)"),
        ("slow", "the replica relaying, an SSE reader per task, TOKEN_FLUSH_MS=100"),
    ):
        best = min(results[name])
        target = "<= 1.3 x bare" if name == "r1" else ""
        bench.add(
            "s",
            f"CPU per 1,000 tokens: {label}",
            f"{best:.1f} ms ({best / bare:.2f} x bare; runs {_runs(results[name])})",
            target,
        )
    for name, label in (("r1", ""), ("slow", ", TOKEN_FLUSH_MS=100")):
        lat = latencies[name]
        bench.add(
            "s",
            f"provider chunk -> SSE reader, {STREAMS} streams, p50 / p99{label}",
            f"{percentile(lat, 50):.1f} / {percentile(lat, 99):.1f} ms",
            "p99 <= 50 ms" if name == "r1" else "",
        )
    bench.add(
        "s",
        "Redis connections of the replica with 1,000 SSE readers",
        " / ".join(str(c) for c in connections),
        "a handful",
    )


def _runs(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


async def _round(
    url: str, proc: psutil.Process, redis_port: int, readers: int
) -> tuple[float, list[float], int]:
    """One round: STREAMS tasks, ``readers`` SSE readers each. The replica's CPU per
    1,000 tokens, each piece's latency (ms), its Redis connections mid-answer."""
    body = {"kind": "chat", "model": "m1", "input": {"messages": MESSAGES, "stream": True}}
    before = cpu_s(proc)
    ids = await submit_all(url, [body] * STREAMS, 32)
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        reading = [
            asyncio.create_task(_read(session, f"{url}/v1/tasks/{tid}/events", latencies))
            for tid in ids
            for _ in range(readers)
        ]
        await asyncio.sleep(ANSWER_S / 2)
        conns = redis_connections(proc, redis_port)
        texts = await asyncio.gather(*reading)
    await _finished(url, ids)
    cpu = cpu_s(proc) - before
    if readers and not all(t.count("@") == TOKENS for t in texts):
        short = sum(t.count("@") != TOKENS for t in texts)
        raise RuntimeError(f"{short} readers did not get the whole answer")
    return cpu * 1000 / (STREAMS * TOKENS / 1000), latencies, conns


async def _read(session: aiohttp.ClientSession, url: str, latencies: list[float]) -> str:
    """Follow one task's events to its record; the text of its tokens events."""
    text = []
    async with session.get(url) as response:
        event = ""
        async for raw in response.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "tokens":
                now = time.time()
                piece = orjson.loads(line[6:])["text"]
                text.append(piece)
                for word in piece.split():
                    if word.startswith("@"):
                        latencies.append((now - float(word[1:])) * 1000)
            elif line.startswith("data: ") and event == "record":
                break
    return "".join(text)


async def _finished(url: str, ids: list[str]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for tid in ids:
            for _ in range(600):
                record = (await client.get(f"/v1/tasks/{tid}")).json()
                if record["status"] in ("succeeded", "failed", "cancelled"):
                    if record["status"] != "succeeded":
                        raise RuntimeError(f"task {tid} {record['status']}: {record.get('error')}")
                    break
                await asyncio.sleep(0.1)


def redis_connections(proc: psutil.Process, port: int) -> int:
    """The TCP connections a process holds to the Redis on ``port``."""
    return sum(
        1
        for c in proc.net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def _bare(fake_url: str) -> float:
    """The bare client, in a process of its own: its CPU per 1,000 tokens."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.streams", "bare", f"{fake_url}/v1", str(STREAMS)],
        capture_output=True,
        check=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    return float(json.loads(out.stdout)["cpu_ms_per_1000_tokens"])


async def _bare_client(base_url: str, n: int) -> int:
    """``n`` streamed chat completions read at once with aiohttp, each chunk parsed as a
    client must to get its text; the tokens read."""
    body = {"model": "m1", "messages": MESSAGES, "stream": True}
    tokens = 0

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal tokens
        async with session.post(f"{base_url}/chat/completions", json=body) as response:
            async for raw in response.content:
                if raw.startswith(b"data: {"):
                    delta = orjson.loads(raw[6:])["choices"]
                    if delta and delta[0]["delta"].get("content"):
                        tokens += 1

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one(session) for _ in range(n)))
    return tokens


def _bare_main(base_url: str, n: int) -> None:
    start = resource.getrusage(resource.RUSAGE_SELF)
    tokens = asyncio.run(_bare_client(base_url, n))
    end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (end.ru_utime - start.ru_utime) + (end.ru_stime - start.ru_stime)
    print(json.dumps({"tokens": tokens, "cpu_ms_per_1000_tokens": cpu * 1000 / (tokens / 1000)}))


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "bare":
        _bare_main(argv[1], int(argv[2]))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
