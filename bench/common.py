"""What the benchmarks share: the figures they report, the processes they start, and
how they load a worker and wait for its tasks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import redis

from llmworker.keys import Keys

ROOT = Path(__file__).resolve().parent.parent


CHAT_INPUT = {
    "messages": [{"role": "user", "content": "Summarise the plot of Hamlet in one line."}]
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Figure:
    scenario: str
    metric: str
    value: str
    target: str = ""


@dataclass
class Bench:
    redis_url: str
    logs: Path
    figures: list[Figure] = field(default_factory=list)

    def add(self, scenario: str, metric: str, value: str, target: str = "") -> None:
        self.figures.append(Figure(scenario, metric, value, target))
        print(f"  {metric}: {value}" + (f"   (target {target})" if target else ""), flush=True)

    @contextlib.contextmanager
    def process(
        self, name: str, args: list[str], env: dict[str, str]
    ) -> Iterator[subprocess.Popen[bytes]]:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            args, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()

    def fake_llm(
        self, port: int, latency_ms: float, tokens: int
    ) -> contextlib.AbstractContextManager[Any]:
        args = [sys.executable, "-m", "llmworker", "fake-llm", "--port", str(port)]
        args += ["--latency-ms", str(latency_ms), "--tokens", str(tokens)]
        return self.process(f"fake-llm-{port}", args, {})

    def serve(
        self, port: int, env: dict[str, str], workers: int = 1
    ) -> contextlib.AbstractContextManager[Any]:
        args = [
            sys.executable,
            "-m",
            "llmworker",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        if workers > 1:
            args += ["--workers", str(workers)]
        return self.process(f"serve-{port}", args, env)


def wait_http(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


def worker_env(bench: Bench, prefix: str, fake_port: int | None, **extra: Any) -> dict[str, str]:
    env = {
        "REDIS_URL": bench.redis_url,
        "REDIS_PREFIX": prefix,
        "LOG_LEVEL": "WARNING",
        "LOG_FORMAT": "json",
    }
    if fake_port is not None:
        env.update({"BENCH_BASE_URL": f"http://127.0.0.1:{fake_port}/v1", "MODEL_M1": "bench/m1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cleanup(bench: Bench, prefix: str) -> None:
    client = redis.Redis.from_url(bench.redis_url)
    keys = list(client.scan_iter(match=Keys(prefix).pattern, count=5000))
    for i in range(0, len(keys), 5000):
        client.delete(*keys[i : i + 5000])
    client.close()


class RawHTTP:
    """A minimal keep-alive HTTP/1.1 client for POSTing JSON: the load generator must cost
    far less CPU than the worker it loads, and general clients cost about as much."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def submit_all(url: str, bodies: list[dict[str, Any]], clients: int) -> list[str]:
    """POST every body with ``clients`` concurrent connections; returns the task ids."""
    host, port = url.removeprefix("http://").split(":")
    ids: list[str] = [""] * len(bodies)
    payloads = [orjson.dumps(b) for b in bodies]
    next_index = 0

    async def one_client() -> None:
        nonlocal next_index
        conn = RawHTTP(host, int(port))
        try:
            while next_index < len(bodies):
                i = next_index
                next_index += 1
                status, answer = await conn.post("/v1/tasks", payloads[i])
                if status != 202:
                    raise RuntimeError(f"submission {i} got {status}: {answer!r}")
                ids[i] = orjson.loads(answer)["id"]
        finally:
            conn.close()

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return ids


def settled(client: redis.Redis, keys: Keys) -> bool:
    """No task waits or runs (two cheap reads, so that polling costs the machine nothing)."""
    depth: dict[str, str] = client.hgetall(keys.depth)  # type: ignore[assignment]
    waiting = sum(int(v) for k, v in depth.items() if "|" not in k)
    return waiting == 0 and client.zcard(keys.running) == 0


def wait_finished(
    bench: Bench, prefix: str, ids: list[str], timeout_s: float
) -> list[dict[str, str]]:
    """Wait until no task waits or runs (:func:`settled`), then read every record once."""
    client = redis.Redis.from_url(bench.redis_url, decode_responses=True)
    keys = Keys(prefix)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if settled(client, keys):
                pipe = client.pipeline(transaction=False)
                for task_id in ids:
                    pipe.hmget(
                        keys.task(task_id), ["status", "created_at", "started_at", "finished_at"]
                    )
                rows = pipe.execute()
                if all(r[0] in ("succeeded", "failed", "cancelled") for r in rows):
                    failed = sum(r[0] != "succeeded" for r in rows)
                    if failed:
                        raise RuntimeError(f"{failed} tasks did not succeed")
                    names = ("status", "created_at", "started_at", "finished_at")
                    return [dict(zip(names, r, strict=True)) for r in rows]
            if time.monotonic() > deadline:
                raise RuntimeError(f"the tasks did not finish within {timeout_s} s")
            time.sleep(0.2)
    finally:
        client.close()


async def _prefill(bench: Bench, prefix: str, env: dict[str, str], n: int) -> None:
    from llmworker.admission import Admitter
    from llmworker.connection import connect
    from llmworker.handlers import registry
    from llmworker.queue import Queue
    from llmworker.record import TaskSpec
    from llmworker.settings import load_settings

    settings = load_settings(env, env_file=None)
    client = connect(bench.redis_url)
    admitter = Admitter(settings, Queue(client, Keys(prefix)), registry)
    spec = TaskSpec.model_validate({"kind": "chat", "input": CHAT_INPUT})
    sem = asyncio.Semaphore(64)

    async def one() -> None:
        async with sem:
            await admitter.submit(spec)

    await asyncio.gather(*(one() for _ in range(n)))
    await client.aclose()


async def _ids(bench: Bench, prefix: str) -> list[str]:
    client = redis.asyncio.Redis.from_url(bench.redis_url, decode_responses=True)
    keys = Keys(prefix)
    ids = [
        k.removeprefix(keys.task(""))
        async for k in client.scan_iter(match=keys.task("*"), count=5000)
    ]
    await client.aclose()
    return ids


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"kind":"chat","user":"bench","input":{"messages":[{"role":"user","content":"hello"}]}}'
wrk.headers["Content-Type"] = "application/json"
"""


def _wrk(bench: Bench, url: str, seconds: int = 10) -> tuple[float, float, float]:
    script = bench.logs / "post.lua"
    script.write_text(WRK_SCRIPT)
    out = subprocess.run(
        ["wrk", "-t1", "-c64", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (bench.logs / "wrk.txt").write_text(out)

    def ms(text: str) -> float:
        for unit, factor in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
            if text.endswith(unit):
                return float(text[: -len(unit)]) * factor
        return float(text)

    lines = out.splitlines()
    rate = float(next(line.split()[1] for line in lines if line.startswith("Requests/sec")))
    latency = {
        line.split()[0]: ms(line.split()[1])
        for line in lines
        if line.strip().startswith(("50%", "99%"))
    }
    if any("Non-2xx" in line for line in lines):
        raise RuntimeError("wrk saw non-2xx answers: " + out)
    return rate, latency["50%"], latency["99%"]


async def _python_load(url: str, clients: int, seconds: float) -> tuple[float, float, float]:
    latencies: list[float] = []
    stop = time.monotonic() + seconds
    body = {
        "kind": "chat",
        "user": "bench",
        "input": {"messages": [{"role": "user", "content": "hello"}]},
    }
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients)) as client:

        async def loop() -> None:
            while time.monotonic() < stop:
                t = time.perf_counter()
                r = await client.post(url, json=body)
                r.raise_for_status()
                latencies.append((time.perf_counter() - t) * 1000)

        await asyncio.gather(*(loop() for _ in range(clients)))
    return len(latencies) / seconds, percentile(latencies, 50), percentile(latencies, 99)


def cpu_s(proc: psutil.Process) -> float:
    """CPU seconds of a process and its children (the worker processes of --workers)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        times = p.cpu_times()
        total += times.user + times.system
    return total


def drain(bench: Bench, n: int, **extra: Any) -> tuple[float, float]:
    """One process draining ``n`` pre-filled tasks on a model with no latency: tasks/s
    (first start to last finish) and CPU us per task. The CPU is counted from readiness
    on, over the tasks started from then on: start-up (imports, connections) is left out."""
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
        **extra,
    )
    try:
        asyncio.run(_prefill(bench, prefix, env, n))
        with bench.serve(port, env) as proc:
            wait_http(f"http://127.0.0.1:{port}/ready")
            server = psutil.Process(proc.pid)
            cpu_ready, ready_ms = cpu_s(server), time.time() * 1000
            ids = asyncio.run(_ids(bench, prefix))
            rows = wait_finished(bench, prefix, ids, timeout_s=300)
            cpu_used = cpu_s(server) - cpu_ready
        first = min(int(r["started_at"]) for r in rows) / 1000
        last = max(int(r["finished_at"]) for r in rows) / 1000
        after_ready = sum(int(r["started_at"]) >= ready_ms for r in rows)
        return n / (last - first), cpu_used / max(1, after_ready) * 1e6
    finally:
        cleanup(bench, prefix)


def ingress_load(
    bench: Bench, seconds: int, workers: int = 1, **extra: Any
) -> tuple[float, float, float, float, str]:
    """``POST /v1/tasks`` from 64 connections for ``seconds`` (the tasks wait: the one
    slot is busy): submissions/s, p50 and p99 ms, the worker's CPU us per submission, and
    the load generator used."""
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
        # The one running task goes back to the queue at once when the run ends.
        SHUTDOWN_GRACE_S=0,
        **extra,
    )
    try:
        with bench.serve(port, env, workers=workers) as proc:
            wait_http(f"http://127.0.0.1:{port}/ready")
            url = f"http://127.0.0.1:{port}/v1/tasks"
            server = psutil.Process(proc.pid)
            before = cpu_s(server)
            if shutil.which("wrk"):
                rate, p50, p99 = _wrk(bench, url, seconds)
                tool = f"wrk -t1 -c64 -d{seconds}s"
            else:
                rate, p50, p99 = asyncio.run(_python_load(url, 64, float(seconds)))
                tool = "httpx, 64 clients (install wrk for a lighter load generator)"
            used = cpu_s(server) - before
        return rate, p50, p99, used / (rate * seconds) * 1e6, tool
    finally:
        cleanup(bench, prefix)
