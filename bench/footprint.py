"""What a task costs Redis: bytes while it waits and once it finished, and the commands a
replica sends for it (what a per-command-billed Redis, such as Upstash, charges).

Commands are counted on the wire: the replica talks to Redis through a proxy here that
counts each command a client sends (a script is one command, as the bill counts it; the
calls inside it are Redis's own work). The count includes what the replica does besides
the tasks while they run (heartbeats, lease renewals, claims), spread over them.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

import orjson
import redis

from bench.common import Bench, cleanup

TASKS = 2_000
USERS = 200
QSTASH_KEY = "sig_benchFootprintKey0000000000000"


class CommandCounter:
    """A TCP proxy to Redis counting the commands clients send (RESP arrays)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.commands = 0
        self.server: asyncio.Server | None = None
        self.piping: set[asyncio.Task[Any]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        # The connections still open end here, before their loop does (closed, not
        # cancelled: asyncio logs a cancelled connection handler as an error).
        for writer in self.writers:
            writer.close()
        await asyncio.gather(*self.piping, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
            parser = _Commands()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while data := await src.read(65536):
                    if count:
                        self.commands += parser.feed(data)
                    dst.write(data)
                    await dst.drain()
            dst.close()

        task = asyncio.current_task()
        if task is not None:
            self.piping.add(task)
        self.writers += [writer, up_writer]
        try:
            await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        finally:
            if task is not None:
                self.piping.discard(task)


class _Commands:
    """Counts complete RESP commands (``*<n>`` arrays of bulk strings) in a byte stream."""

    def __init__(self) -> None:
        self.buffer = b""
        self.args_left = 0  # bulk strings still to read in the current command
        self.bulk_left = -1  # bytes (and CRLF) still to skip in the current bulk string

    def feed(self, data: bytes) -> int:
        self.buffer += data
        done = 0
        while True:
            if self.bulk_left >= 0:
                if len(self.buffer) < self.bulk_left:
                    self.bulk_left -= len(self.buffer)
                    self.buffer = b""
                    return done
                self.buffer = self.buffer[self.bulk_left :]
                self.bulk_left = -1
                self.args_left -= 1
                if self.args_left == 0:
                    done += 1
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return done
            line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            if line.startswith(b"*"):
                self.args_left = int(line[1:])
                if self.args_left <= 0:
                    done += 1
            elif line.startswith(b"$"):
                self.bulk_left = int(line[1:]) + 2
            else:  # an inline command
                done += 1


# What a task is, how it arrives, and whether a reader follows its events (the reader
# on the admitting replica, as a web app's SSE route on another replica would be).
CASES = (
    ("a short chat", 24, False, "api"),
    ("a 400-token streamed chat", 400, True, "api"),
    ("a 400-token streamed chat, followed", 400, True, "reader"),
    ("a short chat delivered by QStash", 24, False, "qstash"),
)


def footprint(bench: Bench) -> None:
    """(m) bytes per waiting and finished task; commands per task."""
    print(f"footprint: {TASKS:,} tasks of {USERS} users, one replica, no latency", flush=True)
    for name, tokens, stream, how in CASES:
        waiting, finished, commands = asyncio.run(_measure(bench, tokens, stream, how))
        if how == "api":
            bench.add("m", f"Redis bytes per waiting task ({name})", f"{waiting:,.0f} B", "<= 1 KB")
        bench.add(
            "m", f"Redis bytes per finished task, kept RESULT_TTL_S ({name})", f"{finished:,.0f} B"
        )
        target = "<= 15" if how == "api" and tokens == 400 else ""
        bench.add("m", f"commands per task ({name})", f"{commands:.1f}", target)


async def _measure(bench: Bench, tokens: int, stream: bool, how: str) -> tuple[float, float, float]:
    url = urlparse(bench.redis_url)
    counter = CommandCounter(url.hostname or "127.0.0.1", url.port or 6379)
    port = await counter.start()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    store = redis.Redis.from_url(bench.redis_url)
    try:
        # One replica admits (it runs nothing: the bytes of waiting), another drains.
        async with _worker(bench, prefix, port, tokens, dispatch=False) as idle:
            base = _used(store)
            start = counter.commands
            ids = await (_deliver(idle, TASKS) if how == "qstash" else _submit(idle, TASKS, stream))
            admitted = counter.commands - start
            waiting = (_used(store) - base) / TASKS
            before = counter.commands
            readers = await _follow(idle, ids) if how == "reader" else None
            async with _worker(bench, prefix, port, tokens, dispatch=True) as busy:
                await _drained(busy)
                if readers is not None:
                    await readers
                    # The readers' hub stops naming itself once they leave.
                    await asyncio.sleep(0.2)
                finished = (_used(store) - base) / TASKS
            ran = counter.commands - before
        return waiting, finished, (admitted + ran) / TASKS
    finally:
        store.close()
        await counter.stop()
        cleanup(bench, prefix)


async def _follow(worker: Any, ids: list[str]) -> asyncio.Future[Any]:
    """A reader per task on ``worker``'s hub, each until its task's final status."""
    from llmworker.states import FINAL_STATES

    async def read(task_id: str) -> None:
        reader, status = await worker.hub.follow(task_id, "0-0")
        try:
            while status not in FINAL_STATES:
                for _id, entry in await reader.next():
                    if entry["type"] == "status":
                        status = orjson.loads(entry["data"])["status"]
        finally:
            worker.hub.leave(reader)

    return asyncio.gather(*(read(task_id) for task_id in ids))


def _used(store: redis.Redis) -> float:
    info: dict[str, Any] = store.info("memory")  # type: ignore[assignment]
    return float(info["used_memory"])


@contextlib.asynccontextmanager
async def _worker(
    bench: Bench, prefix: str, port: int, tokens: int, dispatch: bool
) -> AsyncIterator[Any]:
    from llmworker.logs import configure_logging
    from llmworker.settings import load_settings
    from llmworker.worker import Worker

    db = urlparse(bench.redis_url).path.strip("/") or "0"
    settings = load_settings(
        {
            "REDIS_URL": f"redis://127.0.0.1:{port}/{db}",
            "REDIS_PREFIX": prefix,
            "LOG_LEVEL": "WARNING",
            "FAKE_LATENCY_MS": "0",
            "FAKE_TOKENS": str(tokens),
            "MAX_FAKE_FREE": "200",
            "MAX_USER_FREE": "50",
            "QUEUE_MAX_FREE": str(TASKS),
            "QSTASH_CURRENT_SIGNING_KEY": QSTASH_KEY,
            "QSTASH_NEXT_SIGNING_KEY": QSTASH_KEY,
            "PUBLIC_URL": "http://worker.test",
        },
        env_file=None,
    )
    configure_logging(settings)
    worker = Worker(settings, dispatch=dispatch)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


async def _submit(worker: Any, n: int, stream: bool) -> list[str]:
    from llmworker.record import TaskSpec

    ids: list[str] = []
    for start in range(0, n, 500):
        admitted = await asyncio.gather(
            *(
                worker.admitter.submit(
                    TaskSpec.model_validate(
                        {"kind": "chat", "user": f"user-{i % USERS}",
                         "input": {"messages": [{"role": "user", "content": "hello"}], "stream": stream}}
                    )
                )
                for i in range(start, min(n, start + 500))
            )
        )  # fmt: skip
        ids += [task_id for task_id, _ in admitted]
    return ids


async def _deliver(worker: Any, n: int) -> list[str]:
    """``n`` QStash deliveries, signed as QStash signs them, through the HTTP API."""
    import httpx

    from llmworker import signature
    from llmworker.api import create_app

    app = create_app(worker.settings, worker)
    url = "http://worker.test/v1/qstash"
    ids: list[str] = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://worker.test") as client:
        for i in range(n):
            body = orjson.dumps(
                {"kind": "chat", "user": f"user-{i % USERS}",
                 "input": {"messages": [{"role": "user", "content": "hello"}]}}
            )  # fmt: skip
            headers = {
                "upstash-signature": signature.sign(QSTASH_KEY, body, url),
                "upstash-message-id": f"msg_{uuid.uuid4().hex}",
                "content-type": "application/json",
            }
            answer = await client.post("/v1/qstash", content=body, headers=headers)
            if answer.status_code != 202:
                raise RuntimeError(f"delivery got {answer.status_code}: {answer.text}")
            ids.append(answer.json()["id"])
    return ids


async def _drained(worker: Any) -> None:
    for _ in range(6000):
        stats = await worker.stats()
        if stats["running"] == 0 and all(q["waiting"] == 0 for q in stats["queues"].values()):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("the tasks did not finish")
