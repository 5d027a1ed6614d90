"""A task's events: one Redis stream per task, read back as Server-Sent Events (hub.py).

Status events are written by the Lua scripts in the same step as the change they
report; progress, token and reasoning events are written here by the running task.
Entries are ``type`` (status | progress | tokens | reasoning) and ``data`` (JSON):
``tokens`` and ``reasoning`` carry ``{"text", "n"}``, a batch of the answer's text or of
the model's reasoning (DeepSeek's ``reasoning_content``), in the order the model said
them.

Events cost Redis commands and memory only while somebody may read them. A run nobody
follows keeps its text and its latest progress here, in the process; when a reader
comes (a replica's hub names itself in ``fl:<id>`` and says so on ``follow``), the run
writes what it kept as one event per kind, then streams live. A task nobody ever
followed has no stream at all: its record says how it ended. ``TOKEN_EVENTS=always``
streams every run live, followed or not.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import structlog

from llmworker.scripts import Scripts

log = structlog.get_logger("llmworker.events")

# Tokens go out in batches: after this many, or TOKEN_FLUSH_MS (settings, 20 ms) after
# the batch's first token, whichever comes first (a reader sees text flow without one
# entry per token; a longer wait costs the replica less per token, and readers latency).
TOKEN_BATCH = 5

TEXT_KINDS = ("tokens", "reasoning")


class EventWriter:
    """Writes one run's progress, token and reasoning events, in order.

    Writes join the process's shared batch (scripts.py), which sends in submission
    order: a token batch queued before the run's final status is stored before it,
    without waiting for it.

    ``live``: the run's events go to Redis as they come (somebody follows the task, or
    TOKEN_EVENTS=always); otherwise they are kept until somebody does. The first write
    carries the run's ``running`` status, which events.lua adds only to a stream not
    made yet (one that exists has it: claim.lua or a reader's follow.lua wrote it)."""

    def __init__(
        self,
        scripts: Scripts,
        task_id: str,
        *,
        live: bool = False,
        always: bool = False,
        attempts: int = 0,
        run: int = 0,
        flush_s: float = 0.020,
    ) -> None:
        self.scripts = scripts
        self.flush_s = flush_s
        self.task_id = task_id
        self.live = live or always
        self._always = "1" if always else "0"
        self._first = True
        self._running = orjson.dumps({"status": "running", "attempts": attempts, "run": run})
        self._tokens: list[str] = []
        # What the buffered text is: the answer ("tokens") or the reasoning.
        self._kind = "tokens"
        self._timer: asyncio.TimerHandle | None = None
        self._lost = 0
        # While nobody follows: the events a reader would need, [type, data, n], text of
        # one kind merged into one event, and only the latest progress.
        self._kept: list[list[Any]] = []

    def _write(self, pairs: list[Any]) -> asyncio.Future[Any]:
        running = b""
        if self._first:
            # The first event of this run a reader sees says which run it is.
            self._first = False
            running = self._running
        return self.scripts.call("events", self.task_id, self._always, running, *pairs)

    async def emit(self, etype: str, data: dict[str, Any]) -> None:
        if self.live:
            await self._write([etype, orjson.dumps(data)])
            return
        if etype == "progress":
            self._kept = [e for e in self._kept if e[0] != "progress"]
        self._kept.append([etype, data, 0])

    def token(self, text: str) -> None:
        """Buffer a token; queue the batch when it is full, or ``flush_s`` after its first
        token (a model that pauses mid-answer still shows what it has said)."""
        self._buffer("tokens", text)

    def reasoning(self, text: str) -> None:
        """Buffer a piece of the model's reasoning, batched as tokens are."""
        self._buffer("reasoning", text)

    def _buffer(self, kind: str, text: str) -> None:
        if not self.live:
            last = self._kept[-1] if self._kept else None
            if last is not None and last[0] == kind:
                last[1].append(text)
                last[2] += 1
            else:
                self._kept.append([kind, [text], 1])
            return
        if kind != self._kind:
            # A batch holds one kind: what came before goes out first.
            self.flush()
            self._kind = kind
        self._tokens.append(text)
        if len(self._tokens) >= TOKEN_BATCH:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_s, self.flush)

    def follow(self) -> None:
        """Somebody follows the task now: write what the run kept, then stream live."""
        if self.live:
            return
        self.live = True
        pairs: list[Any] = []
        for etype, data, n in self._kept:
            if etype in TEXT_KINDS:
                data = {"text": "".join(data), "n": n}
            pairs += [etype, orjson.dumps(data)]
        self._kept = []
        if pairs:
            self._written(self._write(pairs))

    def flush(self) -> None:
        """Queue the buffered tokens as one event (also at the end of a run)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._tokens:
            return
        batch, self._tokens = self._tokens, []
        self._written(
            self._write([self._kind, orjson.dumps({"text": "".join(batch), "n": len(batch)})])
        )

    def _written(self, future: asyncio.Future[Any]) -> None:
        future.add_done_callback(self._failed)

    def _failed(self, future: asyncio.Future[Any]) -> None:
        # Token events are a live view; the task's result is what must not be lost. Say
        # so once per run, not once per batch while Redis is away.
        if future.cancelled() or future.exception() is None:
            return
        self._lost += 1
        if self._lost == 1:
            log.warning("token_events_lost", error=str(future.exception()))
