"""Routes and fallbacks: where a task goes when its model cannot take it.

A run whose call failed before anything came back (no call answered, no token
streamed) may leave its model, by the error's class (``fallback_reason``):

- rate limited, or the model's circuit open: the next of the task's models that is
  not stopped (``Queue.fallback`` passes over held models and open circuits), or else
  back to the queue to wait for this one;
- failing (5xx, timeouts, unreachable) after its tries: the next model;
- a prompt longer than the model's context: the next model with a larger one;
- anything else: the task fails as it would without routes.

A refused key, a refused bill or an exhausted quota also opens the model's circuit for
every replica (one line in the log per change); the claim then lets one run through to
probe it, and that run's first answer closes it (``lua/circuit.lua``). Moves made at
claim time (spill-over, a stopped first model) are the claim's (``lua/claim.lua``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from redis.exceptions import RedisError

from llmworker.errors import ModelPaused, ProviderError
from llmworker.observe.metrics import Metrics
from llmworker.providers.client import PAUSE_MIN_S
from llmworker.providers.errors import fallback_reason
from llmworker.queue import Claimed, Queue
from llmworker.settings import Settings

log = structlog.get_logger("llmworker.routing")

# A task waits for its model (paused, or its circuit open) at most this many times.
MAX_PAUSES = 8

# Gives a run's task back to the queue and holds its model (Executor's pause).
PauseFn = Callable[[Claimed, ModelPaused], Awaitable[bool]]


class Router:
    def __init__(self, settings: Settings, queue: Queue, metrics: Metrics, pause: PauseFn) -> None:
        self.settings = settings
        self.queue = queue
        self.metrics = metrics
        self.pause = pause
        # Circuits being closed by the probes that got an answer.
        self._closing: set[asyncio.Future[None]] = set()

    async def divert(self, claimed: Claimed, err: ProviderError) -> bool:
        """The run's call failed before anything came back: move the task to another of
        its models if the failure says to (and open the model's circuit if it is the key
        or the account), or let it wait for its model; False to fail it as usual."""
        reason = fallback_reason(err)
        if not reason:
            return False
        model = claimed.fields.get("model", "")
        wait_s = err.retry_after_s
        if reason == "circuit_open":
            wait_s = wait_s or self.settings.circuit_open_s
            await self.open_circuit(model, err, wait_s)
        elif reason == "unavailable" and claimed.fields.get("probe"):
            # The probe of a circuit opened by an outage: still down.
            await self.open_circuit(model, err, self.settings.circuit_open_s)
        candidates = self.next_models(claimed.fields, model, reason)
        if candidates:
            hold_ms = int(wait_s * 1000) if reason == "rate_limited" and wait_s else 0
            try:
                target = await self.queue.fallback(
                    claimed.id,
                    claimed.token,
                    candidates,
                    skip_stopped=reason in ("rate_limited", "circuit_open"),
                    reason=reason,
                    code=err.code,
                    hold_ms=hold_ms,
                )
            except (RedisError, OSError) as exc:
                log.warning("fallback_not_recorded", model=model, error=str(exc))
                return False
            if target is not None:
                self.metrics.fallback(model, target, reason)
                log.info("task_fallback", model=model, target=target, reason=reason, code=err.code)
                return True
        # Nowhere to go now: wait for this model, as a paused task does (a rate limit is
        # retried on the slot instead when the task has no other model).
        waits = reason == "circuit_open" or (
            reason == "rate_limited" and bool(claimed.fields.get("models"))
        )
        if waits and int(claimed.fields.get("pauses") or 0) < MAX_PAUSES:
            return await self.pause(claimed, ModelPaused(err, wait_s or PAUSE_MIN_S))
        return False

    def next_models(self, fields: dict[str, str], model: str, reason: str) -> list[str]:
        """The task's models after ``model`` that may take it for this ``reason``."""
        models = [m for m in (fields.get("models") or "").split(",") if m]
        later = models[models.index(model) + 1 :] if model in models else []
        if reason != "context":
            return later
        rates = self.settings.rates
        size = rates.context(model)
        return [
            m
            for m in later
            if (found := rates.context(m)) is not None and (size is None or found > size)
        ]

    async def open_circuit(self, model: str, err: ProviderError, wait_s: float) -> None:
        try:
            changed = await self.queue.open_circuit(model, int(wait_s * 1000), err.code)
        except (RedisError, OSError) as exc:
            log.warning("circuit_not_recorded", model=model, error=str(exc))
            return
        if changed:
            log.warning(
                "circuit_opened", model=model, code=err.code, open_s=wait_s, error=err.message
            )

    def probe_answered(self, claimed: Claimed) -> None:
        """The probe of a half-open circuit got an answer: the circuit closes."""
        model = claimed.fields.get("model", "")

        async def close() -> None:
            try:
                if await self.queue.close_circuit(model, claimed.token):
                    log.warning("circuit_closed", model=model)
            except (RedisError, OSError) as exc:
                log.warning("circuit_not_recorded", model=model, error=str(exc))

        job = asyncio.ensure_future(close())
        self._closing.add(job)
        job.add_done_callback(self._closing.discard)

    async def probe_ended(self, claimed: Claimed, answered: bool) -> None:
        """A probe that got no answer (and did not reopen the circuit): the next claim
        may send another one."""
        if not claimed.fields.get("probe") or answered:
            return
        try:
            await self.queue.probe_ended(claimed.fields.get("model", ""), claimed.token)
        except (RedisError, OSError) as exc:
            log.warning("circuit_not_recorded", error=str(exc))
