"""A task's events: one Redis stream per task, read back as Server-Sent Events.

Status events are written by the Lua scripts in the same step as the change they
report; progress and token events are written here by the running task. Entries are
``type`` (status | progress | tokens | log) and ``data`` (JSON).

Readers of running tasks' streams share one blocking ``XREAD`` per process
(:class:`EventHub`), on a connection of its own: a thousand people watching a thousand
tasks cost one Redis connection, not a thousand.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import structlog
from redis.asyncio import Redis

from llmworker.connection import connect
from llmworker.keys import EVENTS_MAXLEN, Keys
from llmworker.scripts import Scripts

log = structlog.get_logger("llmworker.events")

# Tokens go out in batches: after this many, or once this long has passed since the last
# batch, whichever comes first (a reader sees text flow without one entry per token).
TOKEN_BATCH = 5
TOKEN_FLUSH_S = 0.020


class EventWriter:
    """Writes one task's progress and token events, in order.

    Writes join the process's shared batch (scripts.py), which sends in submission
    order: a token batch queued before the run's final status is stored before it,
    without waiting for it."""

    def __init__(self, scripts: Scripts, keys: Keys, task_id: str) -> None:
        self.scripts = scripts
        self.key = keys.events(task_id)
        self._tokens: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._lost = 0

    def _xadd(self, etype: str, data: dict[str, Any]) -> asyncio.Future[Any]:
        return self.scripts.command(
            "XADD", self.key, "MAXLEN", "~", EVENTS_MAXLEN, "*",
            "type", etype, "data", orjson.dumps(data),
        )  # fmt: skip

    async def emit(self, etype: str, data: dict[str, Any]) -> None:
        await self._xadd(etype, data)

    def token(self, text: str) -> None:
        """Buffer a token; queue the batch when it is full, or TOKEN_FLUSH_S after its first
        token (a model that pauses mid-answer still shows what it has said)."""
        self._tokens.append(text)
        if len(self._tokens) >= TOKEN_BATCH:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(TOKEN_FLUSH_S, self.flush)

    def flush(self) -> None:
        """Queue the buffered tokens as one event (also at the end of a run)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._tokens:
            return
        batch, self._tokens = self._tokens, []
        batch_written = self._xadd("tokens", {"text": "".join(batch), "n": len(batch)})
        batch_written.add_done_callback(self._failed)

    def _failed(self, future: asyncio.Future[Any]) -> None:
        # Token events are a live view; the task's result is what must not be lost. Say
        # so once per run, not once per batch while Redis is away.
        if future.cancelled() or future.exception() is None:
            return
        self._lost += 1
        if self._lost == 1:
            log.warning("token_events_lost", error=str(future.exception()))


Entry = tuple[str, dict[str, str]]

# The shared read returns at least this often, to drop streams nobody follows any more.
HUB_BLOCK_MS = 5000
HUB_BATCH = 200


def _after(entry_id: str, cursor: str) -> bool:
    """Stream ids compare as (milliseconds, sequence)."""
    a, _, b = entry_id.partition("-")
    c, _, d = cursor.partition("-")
    return (int(a), int(b or 0)) > (int(c), int(d or 0))


class Subscription:
    """One reader of one stream: the entries after its cursor, in order."""

    def __init__(self, after: str) -> None:
        self.cursor = after
        self.backlog: list[Entry] = []
        self.queue: asyncio.Queue[list[Entry]] = asyncio.Queue()

    async def next(self, timeout_s: float) -> list[Entry]:
        """The next entries, or [] after ``timeout_s`` without any."""
        if self.backlog:
            entries, self.backlog = self.backlog, []
        else:
            try:
                entries = await asyncio.wait_for(self.queue.get(), timeout_s)
            except TimeoutError:
                return []
        fresh = [e for e in entries if _after(e[0], self.cursor)]
        if fresh:
            self.cursor = fresh[-1][0]
        return fresh


class _Watch:
    def __init__(self, cursor: str) -> None:
        self.cursor = cursor  # the last id the shared read has seen
        self.subs: set[Subscription] = set()


class EventHub:
    """Reads every followed stream of this process with one blocking ``XREAD`` and hands
    the entries to their subscriptions. A new stream interrupts the read (``CLIENT
    UNBLOCK``) so it is read from at once; Redis going away only delays the entries."""

    def __init__(self, redis_url: str, redis: Redis, scripts: Scripts) -> None:
        self.url = redis_url
        self.redis = redis  # the shared pool, for catching up
        self.scripts = scripts  # the batcher, for CLIENT UNBLOCK
        self._watches: dict[str, _Watch] = {}
        self._wanted = asyncio.Event()  # some stream is followed
        self._loop: asyncio.Task[None] | None = None
        self._client_id: int | None = None
        self._reading: frozenset[str] = frozenset()

    @contextlib.asynccontextmanager
    async def subscribe(self, key: str, after: str) -> AsyncIterator[Subscription]:
        sub = Subscription(after)
        watch = self._watches.get(key)
        if watch is None:
            watch = self._watches[key] = _Watch(after)
            watch.subs.add(sub)
            self._wanted.set()
            self._ensure_loop()
            await self._interrupt(key)
        else:
            # Entries up to the shared cursor were read before this reader came: read
            # them for it alone; the shared read brings the rest.
            watch.subs.add(sub)
            seen = watch.cursor
            if _after(seen, after):
                missed = await self.redis.xrange(key, f"({after}", seen)
                sub.backlog = list(missed)
        try:
            yield sub
        finally:
            watch.subs.discard(sub)
            if not watch.subs and self._watches.get(key) is watch:
                del self._watches[key]

    def _ensure_loop(self) -> None:
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._read_forever(), name="llmworker-events")

    async def _interrupt(self, key: str) -> None:
        """Make a read that started without ``key`` return, so the next one has it."""
        for _ in range(20):
            if self._client_id is None or not self._reading or key in self._reading:
                return
            with contextlib.suppress(Exception):
                if await self.scripts.command("CLIENT", "UNBLOCK", self._client_id):
                    return
            # The read is not blocked in Redis yet: its command is still on the way.
            await asyncio.sleep(0.005)

    async def _read_forever(self) -> None:
        """Runs until the hub closes; waits without reading while nothing is followed."""
        client = connect(self.url, retries=0, single=True)
        failures = 0
        try:
            while True:
                if not self._watches:
                    self._wanted.clear()
                    await self._wanted.wait()
                    continue
                try:
                    self._client_id = int(await client.client_id())
                    while self._watches:
                        await self._read_once(client)
                        failures = 0
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    failures += 1
                    if failures % 10 == 1:
                        log.warning("event_hub_redis_error", error=str(exc))
                    self._client_id = None
                    await asyncio.sleep(min(2.0, 0.1 * 2**failures))
        finally:
            self._client_id = None
            self._reading = frozenset()
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _read_once(self, client: Redis) -> None:
        reading = dict(self._watches)
        streams = {key: w.cursor for key, w in reading.items()}
        self._reading = frozenset(streams)
        try:
            reply = await client.xread(streams, count=HUB_BATCH, block=HUB_BLOCK_MS)  # type: ignore[arg-type]
        finally:
            self._reading = frozenset()
        for key, entries in reply or ():
            watch = self._watches.get(key)
            # A stream dropped and followed again meanwhile starts from its new cursor.
            if watch is None or watch is not reading.get(key) or not entries:
                continue
            watch.cursor = entries[-1][0]
            for sub in watch.subs:
                sub.queue.put_nowait(entries)

    async def aclose(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
