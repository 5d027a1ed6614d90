"""The Lua scripts, and the one way they (and other writes on the hot path) are sent:
batched.

Concurrent calls (a thousand runs finishing, sixty-four clients submitting) are grouped:
while one batch is on the wire, new calls queue up, and go out together as one pipeline
of ``EVALSHA`` on one connection as soon as it returns. Commands are packed by hiredis
(C), which costs a fraction of redis-py's own packing on this path. An idle process pays one round
trip per call, as before; a busy one pays one round trip per batch instead of one
connection checkout, write and read per call. Each script still runs atomically on its
own: batching changes how calls travel, not what they do.

A Redis that restarted or was flushed forgets the scripts: on ``NOSCRIPT`` they are
loaded again and the calls retried.
"""

from __future__ import annotations

import asyncio
import hashlib
from importlib import resources
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

NAMES = (
    "admit",
    "claim",
    "finish",
    "handback",
    "reap",
    "cancel",
    "renew",
    "callback_claim",
    "callback_end",
)

# Past this many calls a batch is cut, so one reply never grows without bound.
MAX_BATCH = 512


def source(name: str) -> str:
    lua = resources.files("llmworker") / "lua"
    return (lua / "_common.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


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
        # (script name, or "" for a plain command; its arguments; who waits for it)
        self._pending: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def load(self) -> None:
        for _name, src in self.sources.items():
            await self.redis.script_load(src)

    def call(self, name: str, *args: Any) -> asyncio.Future[Any]:
        """Run script ``name`` with ``args``; the future resolves to its reply."""
        return self._enqueue(name, args)

    def command(self, *args: Any) -> asyncio.Future[Any]:
        """Send a plain command (``XADD ...``) in the next batch."""
        return self._enqueue("", args)

    def _enqueue(self, name: str, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((name, args, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())
        return future

    async def _send(self) -> None:
        batch: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]] = []
        try:
            while self._pending:
                # One turn of the loop first: calls made by callbacks that are already
                # due (a claim after a finish) join this batch instead of the next.
                await asyncio.sleep(0)
                batch = self._pending[:MAX_BATCH]
                del self._pending[:MAX_BATCH]
                try:
                    replies = await self._execute([(n, a) for n, a, _ in batch])
                except Exception as exc:  # Redis unreachable: every caller of the batch hears it
                    replies = [exc] * len(batch)
                for (_, _, future), reply in zip(batch, replies, strict=True):
                    if future.done():
                        continue
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
                batch = []
        except asyncio.CancelledError:
            # Nobody will answer these now: their callers must not wait forever.
            for _, _, future in [*batch, *self._pending]:
                future.cancel()
            self._pending.clear()
            raise
        finally:
            self._sender = None

    async def _execute(self, calls: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        replies = await self._pipeline(calls)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            await self.load()
            retried = await self._pipeline([calls[i] for i in missing])
            for i, reply in zip(missing, retried, strict=True):
                replies[i] = reply
        return replies

    async def _pipeline(self, calls: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        """Send the calls on one pooled connection and read every reply. An error reply
        stands in its call's place; if the connection breaks or stalls past
        ``timeout_s``, the calls already answered keep their replies and the rest get
        the error (a claim that was answered must reach its caller)."""
        packed = b"".join(
            hiredis.pack_command(
                ("EVALSHA", self.shas[name], 1, self.prefix_key, *args) if name else args
            )
            for name, args in calls
        )
        pool = self.redis.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        replies: list[Any] = []
        try:
            async with asyncio.timeout(self.timeout_s):
                await conn.send_packed_command(packed, check_health=False)
                for _ in calls:
                    try:
                        replies.append(await conn.read_response())
                    except ResponseError as exc:
                        replies.append(exc)
        except (Exception, asyncio.CancelledError) as exc:
            # A half-read batch leaves replies on the wire: never reuse this connection.
            await conn.disconnect()
            if isinstance(exc, asyncio.CancelledError):
                raise
            failure = (
                RedisTimeoutError(f"Redis did not answer within {self.timeout_s:g} s")
                if isinstance(exc, TimeoutError)
                else exc
            )
            replies += [failure] * (len(calls) - len(replies))
        finally:
            await pool.release(conn)
        return [_noscript(r) for r in replies]


def _noscript(reply: Any) -> Any:
    # Inside a pipeline redis-py reports NOSCRIPT as a plain ResponseError.
    if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
        return NoScriptError(str(reply))
    return reply
