"""Runs one claimed task: its handler, its context, and the outcome it records.

A run ends in exactly one of these ways:

- the handler returns: ``succeeded`` with its result;
- it raises, or its deadline passes: ``failed`` with an error a person can act on;
- it is cancelled (``DELETE``): the record already says ``cancelled``; the run only
  frees its slots;
- its lease was lost (its process stalled past ``LEASE_TTL_S``): it frees its slots and
  the reaper requeues the task;
- its provider asks for a long wait before anything came of the run (a 429 with
  ``Retry-After`` of a second or more; any 429 when the model's cap adapts): the task
  goes back to the queue, its slots freed, and the model takes no task until then
  (``Queue.pause``), at most ``MAX_PAUSES`` times per task, then the wait is done on
  the slot as any retry;
- its call fails before anything came back in a way another model or a wait can help
  with: the task moves to its next model, or waits for this one (``routing.py``);
- its outcome cannot be stored (Redis away): it is kept and stored when Redis answers
  again, and wins over a requeue as long as no other run of the task started
  (``finish.lua``); a replica that stops waits for such outcomes (:meth:`settle`);
- the replica stops: the task goes back to the queue (:meth:`Queue.handback`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
import structlog
from redis.exceptions import RedisError

from llmworker.context import SubmitFn, TaskContext
from llmworker.errors import HandlerError, ModelPaused, ProviderError, TaskError, TaskTimeout
from llmworker.events import EventWriter
from llmworker.handlers import Registry
from llmworker.observe import tracing
from llmworker.observe.metrics import Metrics, NoMetrics
from llmworker.providers import Providers
from llmworker.providers.client import PAUSE_MIN_S
from llmworker.queue import Claimed, Queue, Spent
from llmworker.routing import MAX_PAUSES, Router
from llmworker.settings import Settings
from llmworker.usage import Cost, Pricing, Tokens, run_tokens

log = structlog.get_logger("llmworker.executor")

# While Redis is away, an outcome is offered again at most this long apart, so it lands
# within a second of Redis's return.
RECORD_RETRY_MAX_S = 1.0

StopReason = Literal["cancelled", "lease_lost", "shutdown"]


@dataclass
class Run:
    """A run in this process; ``stop_reason`` is set before its job is cancelled."""

    task_id: str
    token: str
    job: asyncio.Task[None] | None = None
    stop_reason: StopReason | None = None
    # Its events, for a reader who starts following while it runs.
    events: EventWriter | None = None
    # A reader followed the task before its events' writer was made.
    followed: bool = False


class Executor:
    def __init__(
        self,
        settings: Settings,
        queue: Queue,
        registry: Registry,
        providers: Providers,
        submit: SubmitFn,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or NoMetrics()
        self.queue = queue
        self.registry = registry
        self.providers = providers
        self.submit = submit
        self.on_release: Callable[[], None] = lambda: None
        # A final state with a callback_url was recorded: the notifier may deliver now.
        self.on_callback: Callable[[], None] = lambda: None
        # A model was held for this many seconds: dispatchers must look again then.
        self.on_pause: Callable[[float], None] = lambda _s: None
        # Outcomes being stored, each until Redis has taken it.
        self._recording: dict[str, asyncio.Task[bool]] = {}
        self.router = Router(settings, queue, self.metrics, self._pause)
        self.pricing = Pricing(settings)

    async def run(self, claimed: Claimed, run: Run) -> None:
        structlog.contextvars.bind_contextvars(task_id=claimed.id, kind=claimed.fields.get("kind"))
        if moved_from := claimed.fields.get("spilled_from"):
            model = claimed.fields.get("model", "")
            self.metrics.fallback(moved_from, model, "spill")
            log.info("task_spilled", model=model, source=moved_from)
        with tracing.run_span(claimed.fields):
            await self._run(claimed, run)

    async def _run(self, claimed: Claimed, run: Run) -> None:
        started = time.monotonic()
        fields = claimed.fields
        tier, model = fields.get("tier", ""), fields.get("model", "")
        # Admission to the first run: a rerun's start includes the runs before it.
        if fields.get("runs") == "1" and fields.get("created_at") and fields.get("started_at"):
            queued_ms = int(fields["started_at"]) - int(fields["created_at"])
            self.metrics.started(tier, model, max(0, queued_ms) / 1000)
        # claim.lua wrote this run's status for a reader; or a reader came since.
        followed = fields.get("followed") == "1"
        events = EventWriter(
            self.queue.scripts,
            claimed.id,
            live=followed or run.followed,
            always=self.settings.token_events == "always",
            attempts=int(fields.get("attempts") or 0),
            run=int(fields.get("runs") or 0),
            flush_s=self.settings.token_flush_ms / 1000,
        )
        run.events = events
        timeout_s = float(claimed.fields.get("timeout_s") or self.settings.task_timeout_s)
        deadline = started + timeout_s
        status, result, error = "failed", "", ""
        ctx: TaskContext | None = None
        # The deadline's own scope says whether it expired: the event loop's clock (uvloop
        # counts whole milliseconds) may fire it a moment before time.monotonic() agrees.
        scope = asyncio.timeout(timeout_s)
        try:
            try:
                ctx = self._context(claimed, events, deadline)
                async with scope:
                    value = await self._call(ctx, claimed)
                status, result, error = self._serialise(value)
            except TimeoutError as exc:
                error = _err(
                    TaskTimeout(f"The task ran past its timeout of {timeout_s:g} s (timeout_s).")
                    if scope.expired()
                    else HandlerError(f"The handler timed out: {exc or type(exc).__name__}")
                )
            except ProviderError as exc:
                if await self._diverted(claimed, exc, ctx):
                    # A probe that left without an answer: the next claim may probe.
                    await self.router.probe_ended(claimed, False)
                    return
                error = _err(exc)
            except TaskError as exc:
                error = _err(exc)
            finally:
                events.flush()
        except asyncio.CancelledError:
            await asyncio.shield(self._stopped(claimed, run, ctx))
            if run.stop_reason is None:
                raise
            return
        except Exception as exc:
            log.exception("handler_raised")
            error = _err(HandlerError(f"The handler raised {type(exc).__name__}: {exc}"))
        usage = orjson.dumps(ctx.usage).decode() if ctx and ctx.usage else ""
        used = _used(ctx)
        cost = self._cost(claimed, ctx, used)
        outcome = {"result": result, "error": error, "usage": usage, "cost": _json(cost)}
        recorded = await asyncio.shield(self._record(claimed, status, outcome, _spent(ctx, used)))
        await self.router.probe_ended(claimed, ctx is not None and ctx.llm.calls_done > 0)
        run_s = time.monotonic() - started
        if recorded:
            self.metrics.finished(tier, model, status, run_s)
            if cost is not None:
                self.metrics.spent(tier, model, cost)
            if claimed.fields.get("callback_url"):
                self.on_callback()
        log.info("task_finished", status=status if recorded else "stale", run_s=round(run_s, 3))

    async def _record(
        self, claimed: Claimed, status: str, outcome: dict[str, str], spent: Spent
    ) -> bool:
        """Store the outcome, for as long as Redis stays away: the result was computed,
        and paid for, once. True once recorded; False when another run had taken the
        task over (only this run's slots were freed)."""
        # This task (shielded from the run's cancellation) is what the replica's stop
        # waits for while the outcome is not stored.
        this = asyncio.current_task()
        if this is not None:
            self._recording[claimed.token] = this
        try:
            pending = self.queue.finish_soon(
                claimed.id,
                claimed.token,
                status,
                ttl_s=self.settings.result_ttl_s,
                spent=spent,
                **outcome,
            )
            # The slots are as good as free: let the dispatcher queue its next claim now,
            # so it rides in the same round trip as this finish.
            self.on_release()
            try:
                return bool(await pending)
            except (RedisError, OSError) as exc:
                return await self._record_later(claimed, status, outcome, spent, exc)
        finally:
            self._recording.pop(claimed.token, None)

    async def _record_later(
        self,
        claimed: Claimed,
        status: str,
        outcome: dict[str, str],
        spent: Spent,
        error: Exception,
    ) -> bool:
        delay = 0.1
        failures = 1
        log.warning("outcome_waiting_for_redis", error=str(error), tries=failures)
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECORD_RETRY_MAX_S)
            pending = self.queue.finish_soon(
                claimed.id,
                claimed.token,
                status,
                ttl_s=self.settings.result_ttl_s,
                spent=spent,
                **outcome,
            )
            try:
                return bool(await pending)
            except (RedisError, OSError) as exc:
                failures += 1
                if failures % 30 == 0:
                    log.warning("outcome_waiting_for_redis", error=str(exc), tries=failures)

    async def _pause(self, claimed: Claimed, paused: ModelPaused) -> bool:
        """Give the task back and hold its model; False if that cannot be done now."""
        model = claimed.fields.get("model", "")
        try:
            held_ms = await self.queue.pause(
                claimed.id, claimed.token, model, max(1, int(paused.wait_s * 1000))
            )
        except (RedisError, OSError) as exc:
            log.warning("pause_not_recorded", model=model, error=str(exc))
            return False
        if held_ms is not None:
            # A hand-back to wait for an adapted cap holds nothing: not news.
            say = log.info if paused.wait_s >= PAUSE_MIN_S else log.debug
            say("model_paused", model=model, wait_s=round(held_ms / 1000, 3), code=paused.code)
            self.on_pause(held_ms / 1000)
        return True

    async def _diverted(
        self, claimed: Claimed, exc: ProviderError, ctx: TaskContext | None
    ) -> bool:
        """Whether the task left this run for the queue (paused, moved, waiting)."""
        if isinstance(exc, ModelPaused):
            return await self._pause(claimed, exc)
        return ctx is not None and ctx.llm.untouched and await self.router.divert(claimed, exc)

    async def settle(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for outcomes still being stored; give up on the rest,
        saying which (their tasks run again once their leases lapse)."""
        waiting = list(self._recording.values())
        if not waiting:
            return
        log.info("outcomes_settling", count=len(waiting), timeout_s=timeout_s)
        _done, left = await asyncio.wait(waiting, timeout=timeout_s)
        if left:
            lost = sorted(token for token, task in self._recording.items() if task in left)
            for task in left:
                task.cancel()
            log.error(
                "outcomes_not_recorded",
                runs=lost,
                hint="Redis stayed unreachable through the shutdown: these tasks run again",
            )

    @staticmethod
    def _serialise(value: Any) -> tuple[str, str, str]:
        """(status, result, error) for what the handler returned."""
        try:
            return "succeeded", orjson.dumps(value).decode(), ""
        except orjson.JSONEncodeError as exc:
            message = f"The handler's result is not JSON-serialisable: {exc}."
            return "failed", "", _err(HandlerError(message))

    def _context(self, claimed: Claimed, events: EventWriter, deadline: float) -> TaskContext:
        model = claimed.fields.get("model", "")
        llm = self.providers.client(model)
        ctx = TaskContext(claimed, llm, events, self.submit, self.providers)
        llm.on_usage = ctx.add_usage
        llm.deadline = deadline
        llm.sink = events
        llm.may_pause = int(claimed.fields.get("pauses") or 0) < MAX_PAUSES
        llm.may_move = bool(self.router.next_models(claimed.fields, model, "rate_limited"))
        llm.yield_on_limit = self.settings.adaptive_caps
        if claimed.fields.get("started_at"):
            llm.claimed_ms = float(claimed.fields["started_at"])
        if claimed.fields.get("probe"):
            llm.on_answered = lambda: self.router.probe_answered(claimed)
        return ctx

    async def _call(self, ctx: TaskContext, claimed: Claimed) -> Any:
        handler = self.registry.get(ctx.kind)
        if handler is None:
            raise HandlerError(
                f"No handler for kind {ctx.kind!r} in this replica; check TASK_MODULES."
            )
        # The input was validated against the kind's input model at admission.
        return await handler.fn(ctx, claimed.input)

    def _cost(
        self, claimed: Claimed, ctx: TaskContext | None, used: tuple[Tokens, bool]
    ) -> Cost | None:
        """The run's usage by type and its cost (None when it used nothing)."""
        tokens, estimate = used
        if ctx is None or not tokens.total:
            return None
        started = claimed.fields.get("started_at")
        at = datetime.fromtimestamp(int(started) / 1000, UTC) if started else None
        return self.pricing.cost(ctx.model, tokens, at, estimate=estimate)

    async def _stopped(self, claimed: Claimed, run: Run, ctx: TaskContext | None) -> None:
        """After a cancelled run: free its slots, or hand the task back on shutdown."""
        try:
            used = _used(ctx)
            # What streamed before the stop was paid for: the release (or hand-back)
            # books it, and a cancelled task's record shows it, whichever way the stop
            # was learnt (a cancel's message, or a renewal that found the task cancelled).
            cost = self._cost(claimed, ctx, used)
            if cost is not None:
                self.metrics.spent(
                    claimed.fields.get("tier", ""), claimed.fields.get("model", ""), cost
                )
            if run.stop_reason == "cancelled" or run.stop_reason == "lease_lost":
                await self.queue.release(claimed.id, claimed.token, _spent(ctx, used), _json(cost))
            else:
                await self.queue.handback(claimed.id, claimed.token, _json(cost))
            log.info("task_stopped", reason=run.stop_reason or "shutdown")
        except Exception as exc:  # the leases lapse on their own; say so
            log.warning("stop_cleanup_failed", error=str(exc))


def _used(ctx: TaskContext | None) -> tuple[Tokens, bool]:
    """The run's tokens (reported, and estimated for calls cut short), read once for its
    cost and for its rate reservations."""
    return run_tokens(ctx.usage, ctx.llm.cut) if ctx is not None else (Tokens(), False)


def _spent(ctx: TaskContext | None, used: tuple[Tokens, bool]) -> Spent:
    """What the run used, to settle its rate reservations."""
    if ctx is None:
        return Spent(0, 0, 0)
    tokens, _estimated = used
    return Spent(tokens.total, ctx.llm.attempts, tokens.output)


def _json(cost: Cost | None) -> str:
    return orjson.dumps(cost.to_record()).decode() if cost is not None else ""


def _err(exc: TaskError) -> str:
    return orjson.dumps(exc.to_record()).decode()
