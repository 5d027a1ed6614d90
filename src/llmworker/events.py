"""A task's events: one Redis stream per task, read back as Server-Sent Events.

Status events are written by the Lua scripts in the same step as the change they
report; progress, token and reasoning events are written here by the running task.
Entries are ``type`` (status | progress | tokens | reasoning) and ``data`` (JSON):
``tokens`` and ``reasoning`` carry ``{"text", "n"}``, a batch of the answer's text or of
the model's reasoning (DeepSeek's ``reasoning_content``), in the order the model said
them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import structlog

from llmworker.keys import EVENTS_MAXLEN, Keys
from llmworker.scripts import Scripts

log = structlog.get_logger("llmworker.events")

# Tokens go out in batches: after this many, or once this long has passed since the last
# batch, whichever comes first (a reader sees text flow without one entry per token).
TOKEN_BATCH = 5
TOKEN_FLUSH_S = 0.020


class EventWriter:
    """Writes one task's progress, token and reasoning events, in order.

    Writes join the process's shared batch (scripts.py), which sends in submission
    order: a token batch queued before the run's final status is stored before it,
    without waiting for it."""

    def __init__(self, scripts: Scripts, keys: Keys, task_id: str) -> None:
        self.scripts = scripts
        self.key = keys.events(task_id)
        self._tokens: list[str] = []
        # What the buffered text is: the answer ("tokens") or the reasoning.
        self._kind = "tokens"
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
        self._buffer("tokens", text)

    def reasoning(self, text: str) -> None:
        """Buffer a piece of the model's reasoning, batched as tokens are."""
        self._buffer("reasoning", text)

    def _buffer(self, kind: str, text: str) -> None:
        if kind != self._kind:
            # A batch holds one kind: what came before goes out first.
            self.flush()
            self._kind = kind
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
        batch_written = self._xadd(self._kind, {"text": "".join(batch), "n": len(batch)})
        batch_written.add_done_callback(self._failed)

    def _failed(self, future: asyncio.Future[Any]) -> None:
        # Token events are a live view; the task's result is what must not be lost. Say
        # so once per run, not once per batch while Redis is away.
        if future.cancelled() or future.exception() is None:
            return
        self._lost += 1
        if self._lost == 1:
            log.warning("token_events_lost", error=str(future.exception()))
