"""The Lua scripts, and the one way they (and other writes on the hot path) are sent:
batched and pipelined on one connection.

Concurrent calls (a thousand runs finishing, sixty-four clients submitting) are grouped
into batches, each written as one pipeline of ``EVALSHA`` (commands packed by hiredis,
in C, when the call is made, so a bad argument fails its own call only). Up to
``MAX_INFLIGHT`` batches are on the wire at once, on one connection: Redis runs the next
batch while this process reads the replies of the last, and, one connection being one
ordered stream, calls run in the order they were made (a claim queued after a finish
sees the slots that finish freed). An idle process pays one round trip per call; a busy
one a fraction of one. Each script still runs atomically on its own: batching changes
how calls travel, not what they do.

A connection that breaks, or stalls past ``REDIS_TIMEOUT_S`` while writing or reading,
fails the calls written on it and not yet answered (those answered keep their replies);
later calls go out on a new connection. Every new connection loads the scripts first, so
a Redis that restarted knows them before the first call. One that forgot them while
connected (``SCRIPT FLUSH``) answers ``NOSCRIPT``: the scripts are loaded again and
those calls sent again, after the calls already on the wire behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

NAMES = (
    "admit",
    "claim",
    "finish",
    "handback",
    "pause",
    "hold",
    "reap",
    "cancel",
    "renew",
    "callback_claim",
    "callback_end",
    "callback_renew",
    "snapshot",
    "health_add",
    "failures",
    "mark",
    "fallback",
    "circuit",
    "adapt",
    "credits",
    "events",
    "follow",
)

# Past this many calls a batch is cut, so one reply never grows without bound.
MAX_BATCH = 512
# Batches written whose replies are not all read yet.
MAX_INFLIGHT = 4


def source(name: str) -> str:
    lua = resources.files("llmworker") / "lua"
    return (lua / "_common.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


@dataclass
class _Call:
    name: str  # a script, or "" for a plain command
    packed: bytes
    future: asyncio.Future[Any]


@dataclass
class _Link:
    """One connection, and whether it may still carry new batches."""

    conn: AbstractConnection
    broken: bool = False
    released: bool = False
    # Has carried a batch: a write that fails on it may find it closed while idle.
    used: bool = False


@dataclass
class _Batch:
    calls: list[_Call]
    link: _Link
    answered: int = 0
    noscript: list[_Call] = field(default_factory=list)

    def unanswered(self) -> list[_Call]:
        return [*self.noscript, *self.calls[self.answered :]]


class Scripts:
    def __init__(self, redis: Redis, prefix_key: str, timeout_s: float = 10.0) -> None:
        self.redis = redis
        self.prefix_key = prefix_key
        # A batch that gets no answer for this long fails: a half-open connection must
        # not hold every claim, renewal and finish of the process behind it.
        self.timeout_s = timeout_s
        self.sources = {name: source(name) for name in NAMES}
        self.shas = {
            name: hashlib.sha1(src.encode()).hexdigest() for name, src in self.sources.items()
        }
        self._pending: list[_Call] = []
        self._inflight: deque[_Batch] = deque()
        self._link: _Link | None = None
        self._sender: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._room: asyncio.Semaphore | None = None

    async def load(self) -> None:
        for _name, src in self.sources.items():
            await self.redis.script_load(src)

    def call(self, name: str, *args: Any) -> asyncio.Future[Any]:
        """Run script ``name`` with ``args``; the future resolves to its reply."""
        return self._enqueue(name, ("EVALSHA", self.shas[name], 1, self.prefix_key, *args))

    def command(self, *args: Any) -> asyncio.Future[Any]:
        """Send a plain command (``XADD ...``) in the next batch."""
        return self._enqueue("", args)

    def _enqueue(self, name: str, command: tuple[Any, ...]) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            packed = _packed(command)
        except (TypeError, ValueError) as exc:  # a bad argument: this call alone fails
            future.set_exception(exc)
            return future
        self._pending.append(_Call(name, packed, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())
        return future

    def _pack(self, calls: list[_Call]) -> bytes:
        return b"".join(call.packed for call in calls)

    async def _send(self) -> None:
        if self._room is None:
            self._room = asyncio.Semaphore(MAX_INFLIGHT)
        batch: list[_Call] = []
        try:
            while self._pending:
                # One turn of the loop first: calls made by callbacks that are already
                # due (a claim after a finish) join this batch instead of the next.
                await asyncio.sleep(0)
                await self._room.acquire()
                batch = self._pending[:MAX_BATCH]
                del self._pending[:MAX_BATCH]
                link = None
                try:
                    async with asyncio.timeout(self.timeout_s):
                        link = await self._connection()
                        try:
                            await link.conn.send_packed_command(
                                self._pack(batch), check_health=False
                            )
                        except (RedisConnectionError, OSError):
                            if not self._stale(link):
                                raise
                            # An idle connection that Redis closed (it restarted) fails at
                            # the first write, before anything ran: once more, on a new one.
                            await self._broke(link)
                            link = await self._connection()
                            await link.conn.send_packed_command(
                                self._pack(batch), check_health=False
                            )
                        link.used = True
                except Exception as exc:  # Redis unreachable, or the write stalled
                    self._room.release()
                    _fail(batch, _timeout(exc, self.timeout_s))
                    batch = []
                    if link is not None:
                        await self._broke(link)
                    continue
                self._inflight.append(_Batch(batch, link))
                batch = []
                if self._reader is None:
                    self._reader = asyncio.create_task(self._read())
        except asyncio.CancelledError:
            # Nobody will answer these now: their callers must not wait forever.
            for call in [*batch, *self._pending]:
                call.future.cancel()
            self._pending.clear()
            if self._link is not None:
                await asyncio.shield(self._broke(self._link))
            raise
        finally:
            self._sender = None

    def _stale(self, link: _Link) -> bool:
        """Used before and idle now: a failed write on it ran nothing."""
        return link.used and not any(b.link is link for b in self._inflight)

    async def _connection(self) -> _Link:
        if self._link is None:
            conn = await self.redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]
            link = _Link(conn)
            try:
                # A Redis that restarted forgot the scripts: teach it before any call.
                loads = [_packed(("SCRIPT", "LOAD", src)) for src in self.sources.values()]
                await conn.send_packed_command(b"".join(loads), check_health=False)
                for _ in self.sources:
                    await conn.read_response()
            except BaseException:
                await self._release(link)
                raise
            self._link = link
        return self._link

    async def _broke(self, link: _Link) -> None:
        """The link carries no new batches; it is closed once nothing in flight uses it."""
        link.broken = True
        if self._link is link:
            self._link = None
        if not any(b.link is link for b in self._inflight):
            await self._release(link)

    async def _release(self, link: _Link) -> None:
        """Close and give back a connection, once: it may hold replies nobody will read."""
        if link.released:
            return
        link.released = True
        with contextlib.suppress(Exception):
            await link.conn.disconnect()
        with contextlib.suppress(Exception):
            await self.redis.connection_pool.release(link.conn)

    async def _read(self) -> None:
        """Read the replies of the batches in flight, in order, and hand them out."""
        try:
            while self._inflight:
                batch = self._inflight[0]
                try:
                    async with asyncio.timeout(self.timeout_s):
                        await self._read_batch(batch)
                except Exception as exc:
                    await self._lost(batch.link, _timeout(exc, self.timeout_s))
                    continue
                self._inflight.popleft()
                self._release_room()
                if batch.link.broken and not any(b.link is batch.link for b in self._inflight):
                    await self._release(batch.link)
                if batch.noscript:
                    await self._resend(batch.noscript)
        except asyncio.CancelledError:
            for lost in self._inflight:
                for call in lost.unanswered():
                    call.future.cancel()
                self._release_room()
                await asyncio.shield(self._release(lost.link))
            self._inflight.clear()
            raise
        finally:
            self._reader = None

    async def _lost(self, link: _Link, failure: Exception) -> None:
        """The connection broke or stalled: what was written on it and not answered fails."""
        link.broken = True
        if self._link is link:
            self._link = None
        while self._inflight and self._inflight[0].link is link:
            lost = self._inflight.popleft()
            _fail(lost.unanswered(), failure)
            self._release_room()
        await self._release(link)

    async def _read_batch(self, batch: _Batch) -> None:
        while batch.answered < len(batch.calls):
            try:
                reply = await batch.link.conn.read_response()
            except ResponseError as exc:
                reply = _noscript(exc)
            call = batch.calls[batch.answered]
            if isinstance(reply, NoScriptError):
                batch.noscript.append(call)
            elif not call.future.done():
                if isinstance(reply, Exception):
                    call.future.set_exception(reply)
                else:
                    call.future.set_result(reply)
            batch.answered += 1

    async def _resend(self, calls: list[_Call]) -> None:
        """Load the scripts Redis forgot, then send these calls again, first."""
        try:
            await self.load()
        except Exception as exc:
            _fail(calls, exc)
            return
        self._pending[:0] = calls
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())

    def _release_room(self) -> None:
        if self._room is not None:
            self._room.release()


def fields_of(flat: list[str]) -> dict[str, str]:
    """A hash (HGETALL, a script's record) or a stream entry as replies give it: a flat
    list of fields and values."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _packed(command: tuple[Any, ...]) -> bytes:
    packed: bytes = hiredis.pack_command(command)
    return packed


def _timeout(exc: Exception, timeout_s: float) -> Exception:
    if isinstance(exc, TimeoutError):
        return RedisTimeoutError(f"Redis did not answer within {timeout_s:g} s")
    return exc


def _fail(calls: list[_Call], exc: BaseException) -> None:
    for call in calls:
        if not call.future.done():
            call.future.set_exception(exc)


def _noscript(reply: Any) -> Any:
    # Inside a pipeline redis-py reports NOSCRIPT as a plain ResponseError.
    if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
        return NoScriptError(str(reply))
    return reply
