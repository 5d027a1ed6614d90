"""A task's events: one Redis stream per task, read back as Server-Sent Events.

Status events are written by the Lua scripts in the same step as the change they
report; progress and token events are written here by the running task. Entries are
``type`` (status | progress | tokens | log) and ``data`` (JSON).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import structlog
from redis.asyncio import Redis

from llmworker.keys import EVENTS_MAXLEN, Keys

log = structlog.get_logger("llmworker.events")

# Tokens go out in batches: after this many, or once this long has passed since the last
# batch, whichever comes first (a reader sees text flow without one entry per token).
TOKEN_BATCH = 5
TOKEN_FLUSH_S = 0.020


class EventWriter:
    """Writes one task's progress and token events, in order."""

    def __init__(self, redis: Redis, keys: Keys, task_id: str) -> None:
        self.redis = redis
        self.key = keys.events(task_id)
        self._tokens: list[str] = []
        self._last_flush = time.monotonic()
        self._flushing: asyncio.Task[None] | None = None

    async def emit(self, etype: str, data: dict[str, Any]) -> None:
        await self.redis.xadd(
            self.key,
            {"type": etype, "data": orjson.dumps(data)},
            maxlen=EVENTS_MAXLEN,
            approximate=True,
        )

    def token(self, text: str) -> None:
        """Buffer a token; start a flush when the batch is full or due."""
        self._tokens.append(text)
        due = time.monotonic() - self._last_flush >= TOKEN_FLUSH_S
        if (len(self._tokens) >= TOKEN_BATCH or due) and self._flushing is None:
            self._flushing = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._tokens:
                batch, self._tokens = self._tokens, []
                self._last_flush = time.monotonic()
                await self.emit("tokens", {"text": "".join(batch), "n": len(batch)})
        except Exception as exc:  # token events are a view; the result is what matters
            log.warning("token_events_lost", error=str(exc))
        finally:
            self._flushing = None

    async def flush(self) -> None:
        """Write out every buffered token (at the end of a run)."""
        if self._flushing is not None:
            await asyncio.shield(self._flushing)
        if self._tokens:
            await self._drain()
