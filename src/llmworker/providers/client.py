"""What ``ctx.llm`` is: chat completions on the task's model, with retries.

Retryable failures (429, 5xx, timeouts, refused or dropped connections) are retried with
exponential backoff and full jitter; a provider's ``Retry-After`` wins over the backoff;
no attempt starts after the task's deadline.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson
import structlog

from llmworker.errors import ModelPaused, ProviderError
from llmworker.providers.base import ChatBackend
from llmworker.providers.errors import outcome_of, translate
from llmworker.providers.stream import ChatResult, Sink
from llmworker.settings import ModelAlias, Provider
from llmworker.usage import wide_chars

log = structlog.get_logger("llmworker.providers")

BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
MAX_TRIES = 8  # per call, even when the deadline is far
# A task with another model to go to tries a failing one this many times, then moves.
MOVE_AFTER_TRIES = 3
# A provider's wait at least this long is waited out in the queue, not on a slot.
PAUSE_MIN_S = 1.0


class CallReport(NamedTuple):
    """One try of a provider call, as metrics, provider health and traces see it."""

    alias: str
    provider: str
    model: str  # the provider's name for it
    outcome: str  # ok, rate_limited, server_error, timeout, client_error
    duration_s: float
    ttft_s: float | None
    error: str  # the ProviderError's code; "" when ok
    usage: dict[str, Any] | None
    # When the run making the call was claimed (Redis time, ms; else when the call
    # started): adaptive caps weigh only runs let in after their last change.
    started_ms: float = 0.0


CallObserver = Callable[[CallReport], None]
# A model's provider said it is out of room for this many seconds (alias, seconds).
HoldFn = Callable[[str, float], None]


class _Timed:
    """Passes tokens on to the task's events (if they stream) and notes when the first
    one came: the time to first token."""

    __slots__ = ("chars", "first", "inner", "wide")

    def __init__(self, inner: Sink | None) -> None:
        self.inner = inner
        self.first: float | None = None
        # What streamed, to estimate the usage of a call cut short (usage.py).
        self.chars = 0
        self.wide = 0

    def _count(self, text: str) -> None:
        self.chars += len(text)
        self.wide += wide_chars(text)

    def token(self, text: str) -> None:
        if self.first is None:
            self.first = time.monotonic()
        self._count(text)
        if self.inner is not None:
            self.inner.token(text)

    def reasoning(self, text: str) -> None:
        if self.first is None:
            self.first = time.monotonic()
        self._count(text)
        if self.inner is not None:
            self.inner.reasoning(text)


class LLMClient:
    def __init__(
        self,
        alias: ModelAlias,
        provider: Provider,
        backend: ChatBackend,
        on_usage: Callable[[dict[str, Any]], None] | None = None,
        deadline: float | None = None,
        sink: Sink | None = None,
        observe: CallObserver | None = None,
    ) -> None:
        self.alias = alias
        self.provider = provider
        self.backend = backend
        self.on_usage = on_usage
        self.deadline = deadline
        self.sink = sink
        self.observe = observe
        self.on_limit: HoldFn | None = None
        self.attempts = 0
        # Set by the executor: this run may give its task back to wait out a long
        # Retry-After (it has not used up its pauses).
        self.may_pause = False
        # Set by the executor: the task has other models to go to, so a rate limit sends
        # it there at once instead of being retried here.
        self.may_move = False
        # Set by the executor: the model's cap adapts, so a 429 without a long wait also
        # gives the task back (the claim lets it in again when the cut cap has room).
        self.yield_on_limit = False
        # Called once, after the first call that the provider answered (a probe closes
        # the model's circuit).
        self.on_answered: Callable[[], None] | None = None
        self.calls_done = 0
        self.streamed = False
        # Calls cut short after something streamed, with no usage reported: characters
        # (and wide ones) of their prompts and of what streamed, for an estimate.
        self.cut = [0, 0, 0, 0]
        self._began_ms = 0.0
        # When the run was claimed (Redis time, ms): the calls' time for adaptive caps,
        # which weigh only runs let in after their last change.
        self.claimed_ms: float | None = None

    async def chat(
        self, messages: list[dict[str, Any]], *, stream_tokens: bool = True, **params: Any
    ) -> ChatResult:
        """A chat completion. Its text and reasoning stream to the task's events unless
        ``stream_tokens`` is False; ``params`` are OpenAI's chat parameters (temperature,
        max_tokens, tools, response_format ...), passed to the provider as given."""
        request = {"messages": messages, **{k: v for k, v in params.items() if v is not None}}
        sink = self.sink if stream_tokens else None
        tries = 0
        while True:
            tries += 1
            self.attempts += 1
            timed = _Timed(sink)
            began = time.monotonic()
            self._began_ms = self.claimed_ms or time.time() * 1000
            try:
                result = await self.backend.complete(request, timed)
            except asyncio.CancelledError:
                self._note_cut(messages, timed)
                raise
            except Exception as exc:
                self._note_cut(messages, timed)
                err = translate(exc, self.alias, self.provider)
                self._report(began, timed, outcome_of(err), err.code, None)
                self.streamed = self.streamed or timed.first is not None
                if self.may_move and self.untouched and err.code == "provider_rate_limited":
                    raise err from exc
                if self._pausable(err):
                    # The model is held for the provider's wait, if it named one.
                    raise ModelPaused(err, err.retry_after_s or 0.0) from exc
                delay = self._delay(err, tries)
                if delay is None:
                    if err.retryable and tries > 1:
                        err.message = f"{err.message} (gave up after {tries} tries)"
                    raise err from exc
                log.warning(
                    "provider_retry",
                    model=self.alias.alias,
                    code=err.code,
                    tries=tries,
                    delay_s=round(delay, 3),
                )
                await asyncio.sleep(delay)
                continue
            self._report(began, timed, "ok", "", result.usage)
            self.calls_done += 1
            if self.calls_done == 1 and self.on_answered is not None:
                self.on_answered()
            if result.limit_reset_s and self.on_limit is not None:
                self.on_limit(self.alias.alias, result.limit_reset_s)
            if self.on_usage and result.usage:
                self.on_usage(result.usage)
            return result

    def _note_cut(self, messages: list[dict[str, Any]], timed: _Timed) -> None:
        if not timed.chars:
            return
        text = orjson.dumps(messages).decode()
        self.cut[0] += len(text)
        self.cut[1] += wide_chars(text)
        self.cut[2] += timed.chars
        self.cut[3] += timed.wide

    @property
    def untouched(self) -> bool:
        """Nothing of this run came back yet: no call answered, no token streamed. Until
        then the task may go to another model (or back to the queue) losing nothing."""
        return self.calls_done == 0 and not self.streamed

    def _report(
        self,
        began: float,
        timed: _Timed,
        outcome: str,
        error: str,
        usage: dict[str, Any] | None,
    ) -> None:
        if self.observe is None:
            return
        ttft = None if timed.first is None else timed.first - began
        self.observe(
            CallReport(
                self.alias.alias,
                self.provider.name,
                self.alias.model,
                outcome,
                time.monotonic() - began,
                ttft,
                error,
                usage,
                self._began_ms,
            )
        )

    def _pausable(self, err: ProviderError) -> bool:
        """Wait in the queue rather than on the slot: the provider asked for a long wait,
        or the model's cap adapts (a run let in above what the provider takes waits for
        the cut cap to let it in again); and giving the task back loses nothing (no call
        of this run has answered, no token of any of its tries has streamed: what
        streamed was paid for, and is booked only by the run's end)."""
        if not (self.may_pause and err.code == "provider_rate_limited" and self.untouched):
            return False
        wait = err.retry_after_s
        return (wait is not None and wait >= PAUSE_MIN_S) or self.yield_on_limit

    def _delay(self, err: ProviderError, tries: int) -> float | None:
        """Seconds to wait before the next try, or None to give up."""
        if not err.retryable or tries >= MAX_TRIES:
            return None
        if self.may_move and self.untouched and tries >= MOVE_AFTER_TRIES:
            return None
        backoff = random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (tries - 1)))
        delay = err.retry_after_s if err.retry_after_s is not None else backoff
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None
        return delay
