"""Event readers share: one hub per process reads the events of every task its readers
follow, on a constant number of Redis connections however many readers there are.

A reader (an SSE response, api.py) asks the hub to follow a task from an event id. The
hub names itself in the task's ``fl:<id>`` set (follow.lua): from then on every event of
the task is written (events.py, lua/_common.lua) and the hub is told the task's id on
its own Pub/Sub channel, ``hub:<replica>``. It then reads the new entries of all the
tasks it was told of with one non-blocking ``XREAD`` over many streams, sent through the
process's command batch (scripts.py), and hands each reader the entries past its own
last id. So a thousand readers cost one Pub/Sub connection and a share of the batch's
one connection, on any Redis: no blocking read, no ``CLIENT UNBLOCK``.

Nothing is missed: the hub subscribes (and waits for Redis to confirm it) before it
names itself anywhere, and reads each followed stream once it is named; after a lost
Pub/Sub connection, or once per ``TICK_S`` anyway, it reads every followed stream
again and renews its names.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llmworker.connection import connect
from llmworker.keys import FOLLOW_TTL_S, Keys
from llmworker.scripts import Scripts, fields_of

log = structlog.get_logger("llmworker.hub")

# Streams read by one XREAD, and entries taken of each per read (more: read again).
STREAMS_PER_READ = 256
ENTRIES_PER_STREAM = 200
# A reader that lags this many entries behind gets no more until it has sent them (the
# hub reads the rest from Redis again then): a slow client costs memory, bounded.
MAX_PENDING = 1000
# How often the hub renews its names, reads every followed stream again, wakes every
# reader (an SSE keep-alive for those with nothing new) and checks its Pub/Sub link.
TICK_S = 15.0

Entry = tuple[str, dict[str, str]]


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Reader:
    """One reader of one task's events: the entries handed to it and not yet sent."""

    __slots__ = ("_waiter", "after", "gone", "pending", "ref")

    def __init__(self, ref: str, after: str) -> None:
        self.ref = ref
        # The last entry handed to this reader (or the id it resumes after).
        self.after = _id(after)
        self.pending: list[Entry] = []
        # The task's record expired while it was followed.
        self.gone = False
        self._waiter: asyncio.Future[None] | None = None

    async def next(self) -> list[Entry]:
        """The entries handed over since the last call, once there are some, or none
        when woken without: every ``TICK_S`` (time for a keep-alive), when the task
        is gone, or by :meth:`wake`."""
        if not self.pending and not self.gone:
            # One future per wait and no timer: the hub's tick wakes every reader.
            self._waiter = waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        entries, self.pending = self.pending, []
        return entries

    def wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class EventHub:
    def __init__(
        self, redis_url: str, scripts: Scripts, keys: Keys, name: str, timeout_s: float = 10.0
    ) -> None:
        self.redis_url = redis_url
        self.timeout_s = timeout_s
        self.scripts = scripts
        self.keys = keys
        self.name = name
        self.channel = keys.hub_channel(name)
        self.readers: dict[str, set[Reader]] = {}
        self._dirty: set[str] = set()
        self._kick = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        # The Pub/Sub link, and how many replies it gave (its health, tick by tick).
        self._link: AbstractConnection | None = None
        self._heard = 0
        # Subscriptions confirmed: more than one means the link was lost and made again.
        self.subscriptions = 0

    # -- for readers ----------------------------------------------------------------

    async def follow(self, ref: str, after: str) -> tuple[Reader, str | None]:
        """Follow task ``ref``'s events after entry id ``after``. Also returns the task's
        status as it was when the hub named itself (None: no such task any more)."""
        self._start()
        if not self._subscribed.is_set():
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._subscribed.wait()
            except TimeoutError:
                raise RedisTimeoutError(
                    f"Redis did not confirm the event hub's subscription within {self.timeout_s:g} s"
                ) from None
        reader = Reader(ref, after)
        self.readers.setdefault(ref, set()).add(reader)
        try:
            status = await self.scripts.call("follow", ref, self.name, FOLLOW_TTL_S * 1000)
        except BaseException:
            self.leave(reader)
            raise
        self._mark(ref)
        return reader, status

    def leave(self, reader: Reader) -> None:
        readers = self.readers.get(reader.ref)
        if readers is None:
            return
        readers.discard(reader)
        if not readers:
            del self.readers[reader.ref]
            # The writer need not tell this hub any more (else the name lapses).
            gone = self.scripts.command("SREM", self.keys.followers(reader.ref), self.name)
            gone.add_done_callback(_ignored)

    def caught_up(self, reader: Reader) -> None:
        """The reader sent what it was handed: read on if it had stopped being fed."""
        self._mark(reader.ref)

    def _mark(self, ref: str) -> None:
        self._dirty.add(ref)
        self._kick.set()

    # -- the hub's own work ---------------------------------------------------------

    def _start(self) -> None:
        if self._tasks or self._closing:
            return
        self._tasks = [
            asyncio.create_task(self._listen_forever(), name="hub-listen"),
            asyncio.create_task(self._read_forever(), name="hub-read"),
            asyncio.create_task(self._tick_forever(), name="hub-tick"),
        ]

    async def stop(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    async def _listen_forever(self) -> None:
        delay = 0.1
        while True:
            # A connection of its own, read as replies come (no client-side Pub/Sub
            # machinery per message: thousands a second pass here). Lost, it is known
            # here, and every followed stream is read again once subscribed anew.
            client = connect(self.redis_url, retries=0)
            conn = client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
            self._link = conn
            try:
                await conn.connect()
                await conn.send_command("SUBSCRIBE", self.channel)
                while True:
                    # ["message", channel, id], ["subscribe", channel, n], ["pong", ""]
                    reply = await conn.read_response()
                    self._heard += 1
                    kind = reply[0]
                    if kind == "message":
                        self._dirty.add(reply[2])
                        self._kick.set()
                    elif kind == "subscribe":
                        # Confirmed: whatever is published from now on reaches us.
                        self.subscriptions += 1
                        self._subscribed.set()
                        delay = 0.1
                        self._dirty.update(self.readers)
                        self._kick.set()
            except (RedisError, OSError, ValueError) as exc:
                self._subscribed.clear()
                log.warning("event_hub_reconnecting", error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                self._link = None
                with contextlib.suppress(Exception):
                    await conn.disconnect()
                with contextlib.suppress(Exception):
                    await client.aclose()

    async def _read_forever(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            while self._dirty:
                refs = [r for r in self._dirty if r in self.readers][:STREAMS_PER_READ]
                if not refs:
                    self._dirty.clear()
                    break
                self._dirty.difference_update(refs)
                try:
                    await self._read(refs)
                except Exception as exc:
                    # Read again shortly (Redis away, or a fault here: the readers of
                    # every other task must not wait for ever behind it).
                    if isinstance(exc, RedisError | OSError):
                        log.warning("event_hub_read_failed", error=str(exc))
                    else:
                        log.exception("event_hub_read_failed")
                    self._dirty.update(refs)
                    await asyncio.sleep(0.5)

    async def _read(self, refs: list[str]) -> None:
        keys, cursors = [], []
        start: dict[str, tuple[int, int]] = {}
        for ref in refs:
            fed = [r.after for r in self.readers[ref] if len(r.pending) < MAX_PENDING]
            if not fed:
                continue
            start[ref] = ms, seq = min(fed)
            keys.append(self.keys.events(ref))
            cursors.append(f"{ms}-{seq}")
        if not keys:
            return
        reply = await self.scripts.command(
            "XREAD", "COUNT", ENTRIES_PER_STREAM, "STREAMS", *keys, *cursors
        )
        # XREAD's reply: [key, entries] per stream with news, or nothing.
        for key, raw in reply or ():
            ref = key[len(self.keys.events("")) :]
            if len(raw) >= ENTRIES_PER_STREAM:
                self._dirty.add(ref)  # more is there
                self._kick.set()
            # Read once, whoever of the task's readers gets which part of it.
            entries = [(_id(i), (i, fields_of(f))) for i, f in raw]
            for reader in self.readers.get(ref, ()):
                if len(reader.pending) >= MAX_PENDING:
                    continue
                if reader.after < start[ref]:
                    # It came while this read was out, from further back: the read its
                    # arrival marked serves it (entries from here on would skip a gap).
                    continue
                fresh = [entry for at, entry in entries if at > reader.after]
                if fresh:
                    reader.pending += fresh
                    reader.after = _id(fresh[-1][0])
                    reader.wake()

    async def _tick_forever(self) -> None:
        heard = -1
        while True:
            await asyncio.sleep(TICK_S)
            await self._check_link(heard)
            heard = self._heard
            refs = list(self.readers)
            calls = [
                self.scripts.call("follow", ref, self.name, FOLLOW_TTL_S * 1000) for ref in refs
            ]
            replies = await asyncio.gather(*calls, return_exceptions=True)
            for ref, status in zip(refs, replies, strict=True):
                if status is None:  # the task's record expired
                    for reader in self.readers.get(ref, ()):
                        reader.gone = True
            # Anything a lost notice would have said is read now; every reader wakes.
            self._dirty.update(refs)
            self._kick.set()
            for readers in list(self.readers.values()):
                for reader in readers:
                    reader.wake()

    async def _check_link(self, heard: int) -> None:
        """A Pub/Sub link that answered nothing, not even the last tick's PING, is
        half-open: close it (the listener connects anew)."""
        link = self._link
        if link is None:
            return
        try:
            if heard == self._heard:
                await link.disconnect()
            else:
                await link.send_command("PING")
        except (RedisError, OSError) as exc:
            log.warning("event_hub_ping_failed", error=str(exc))


def _ignored(future: asyncio.Future[Any]) -> None:
    """A clean-up that may fail (Redis away): the name lapses by itself then."""
    if not future.cancelled():
        future.exception()
