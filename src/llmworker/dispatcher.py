"""The dispatcher: in every replica, claims runnable tasks the moment they can run.

It never sleep-polls. A submission into a lane with a free slot, a freed slot, a reaped
task and a cancellation arrive as Redis Pub/Sub messages and wake it at once; a run that
ends in this process wakes it directly. Messages are only published while some
dispatcher is idle (its last claim came back short): a busy one claims again by itself.
When a claim finds nothing, it waits for the next wake (or, as a safety net for leases
that lapsed unseen, a third of the lease TTL).

Beside the claim loop run three more loops: the listener (Pub/Sub), the renewer (extends
the leases of this replica's runs every third of ``LEASE_TTL_S`` in one script call) and
the reaper (requeues the tasks of dead replicas when their leases lapse). Each loop logs
its errors and carries on until the dispatcher stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from llmworker.connection import connect
from llmworker.executor import Executor, Run, StopReason
from llmworker.guards import GuardPlan
from llmworker.keys import Keys
from llmworker.queue import Claimed, Queue, claim_wait_s, claimed_tasks
from llmworker.settings import Settings

log = structlog.get_logger("llmworker.dispatcher")

# A dispatcher stays listed as idle this much longer than it waits, so a slow claim
# reply cannot open a window in which nobody wakes it.
IDLE_MARGIN_S = 5.0
# A held model is looked at again this long after its hold expires (clocks, timers).
HOLD_MARGIN_S = 0.01
# A failing loop retries after 0.1 s, doubling up to 2 s.
RETRY_AFTER_ERROR_S = 0.1
RETRY_MAX_S = 2.0
# A follow notice for a task not running here is kept this long (its claim's reply may
# still be on its way), and at most this many are kept.
EARLY_FOLLOW_S = 5.0
EARLY_FOLLOWS_KEPT = 1000
# On stop, outcomes still waiting for Redis get at least this long to be stored.
SETTLE_MIN_S = 5.0


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        keys: Keys,
        queue: Queue,
        executor: Executor,
        replica_id: str,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = keys
        self.queue = queue
        self.executor = executor
        self.replica_id = replica_id
        self.plan = GuardPlan.from_settings(settings)
        self.kinds = "*"
        self.lease_ms = int(settings.lease_ttl_s * 1000)
        # Listed as idle a little past the wait, so no wake falls in between.
        self._idle_ms = int((settings.lease_ttl_s / 3 + IDLE_MARGIN_S) * 1000)
        self.runs: dict[str, Run] = {}
        self.claimed_total = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        # A claim queued by a wake while the claim loop waited, and how many it asked for:
        # queued at once, it rides the round trip of the finish that freed the slot.
        self._next_claim: tuple[asyncio.Future[Any], int] | None = None
        self._waiting = False
        # The timer that wakes the claim loop when a model holding back tasks may take
        # them (a hold or a circuit ends, a rate window frees up), and when it fires.
        self._timer: asyncio.TimerHandle | None = None
        # Draining stops the claims; closing, once the runs are done or handed back,
        # stops the loops that keep them alive (renew, listen, reap).
        self._draining = asyncio.Event()
        self._closing = asyncio.Event()
        # Set to renew at once (and so hear what the Pub/Sub link missed), or to stop.
        self._renew_now = asyncio.Event()
        # Follow notices for tasks not running here (yet): a claim's reply may come after
        # the notice of a reader who followed the task just as it started. By id: when.
        self._early_follows: dict[str, float] = {}
        self._cut = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._claim_loop: asyncio.Task[None] | None = None
        executor.on_release = self.wake
        executor.on_pause = self.held

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def cut_short(self) -> None:
        """Stop waiting for running tasks: hand them back now (a second Ctrl+C)."""
        self._cut.set()

    def start(self) -> None:
        # Only the kinds this replica has handlers for (TASK_MODULES are loaded by now):
        # replicas that load different modules never take each other's tasks.
        self.kinds = " ".join(self.executor.registry.names)
        self._claim_loop = self._spawn("claim", self._claim_forever, self._draining)
        self._loops = [
            self._spawn("listen", self._listen, self._closing),
            self._spawn("renew", self._renew_forever, self._closing),
            self._spawn("reap", self._reap_forever, self._closing),
        ]

    def wake(self) -> None:
        """Claim now: a task or a slot may be free. While the claim loop waits, the claim
        is queued right here, so it joins the batch of whatever was queued just before
        (the finish that freed the slot); otherwise the loop claims again when done."""
        if self._waiting and self._next_claim is None and not self._draining.is_set():
            want = self._want()
            if want > 0:
                self._next_claim = (self._claim_soon(want), want)
        self._wake.set()

    def held(self, seconds: float) -> None:
        """A model is held for ``seconds`` (pause.lua): then every replica looks again,
        told on the wake channel by this one (claims skip the model until then, and an
        idle replica would otherwise look only when its wait runs out)."""
        asyncio.get_running_loop().call_later(seconds + HOLD_MARGIN_S, self._hold_ended)

    def _hold_ended(self) -> None:
        if self._draining.is_set():
            return
        told = self.queue.scripts.command("PUBLISH", self.keys.wake_channel, "hold")
        # Another replica's own idle wait covers a wake that could not be sent.
        told.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.wake()

    def _look_again_in(self, seconds: float) -> None:
        """Claim again in ``seconds``: a model that held back waiting tasks may take them
        then. One timer, for the earliest such time."""
        loop = asyncio.get_running_loop()
        when = loop.time() + seconds + HOLD_MARGIN_S
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = loop.call_at(when, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self.wake()

    def _want(self) -> int:
        free = self.settings.worker_concurrency - len(self.runs)
        return min(free, self.settings.claim_batch)

    def _claim_soon(self, want: int) -> asyncio.Future[Any]:
        return self.queue.claim_soon(
            self.replica_id, want, self.lease_ms, self.plan, self._idle_ms, self.kinds
        )

    async def stop(self, grace_s: float) -> None:
        """Stop claiming; let runs finish within ``grace_s`` (their leases still renewed
        and cancellations still heard); hand the rest back; then stop the loops."""
        self._draining.set()
        self._wake.set()
        self._room.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._claim_loop is not None:
            await asyncio.gather(self._claim_loop, return_exceptions=True)
        if self._next_claim is not None:
            # Queued by a wake just before the drain: what it took goes straight back.
            pending, self._next_claim = self._next_claim[0], None
            taken: list[Claimed] = []
            with contextlib.suppress(Exception):
                taken = claimed_tasks(await pending)
            for task in taken:
                # One that cannot go back now goes back when its lease lapses.
                with contextlib.suppress(Exception):
                    await self.queue.handback(task.id, task.token)
        jobs = [run.job for run in self.runs.values() if run.job is not None]
        if jobs and grace_s > 0 and not self._cut.is_set():
            log.info("draining", running=len(jobs), grace_s=grace_s)
            ended = asyncio.ensure_future(asyncio.wait(jobs))
            cut = asyncio.ensure_future(self._cut.wait())
            await asyncio.wait({ended, cut}, timeout=grace_s, return_when=FIRST_COMPLETED)
            for waiter in (ended, cut):
                waiter.cancel()
            if self._cut.is_set():
                log.info("drain_cut_short", running=sum(not job.done() for job in jobs))
        leftover = list(self.runs.values())
        for run in leftover:
            run.stop_reason = "shutdown"
            if run.job is not None:
                run.job.cancel()
        if leftover:
            await asyncio.gather(*(r.job for r in leftover if r.job), return_exceptions=True)
            log.info("handed_back", tasks=len(leftover))
        # Outcomes computed but not yet stored (Redis away) get their own grace. Their
        # runs are over, so their leases are no longer renewed: the finish script takes
        # a late outcome as long as no other run of the task has started.
        await self.executor.settle(max(grace_s, SETTLE_MIN_S))
        self._closing.set()
        self._renew_now.set()
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)

    # -- loops ---------------------------------------------------------------------

    def _spawn(
        self, name: str, body: Callable[[], Awaitable[None]], stop: asyncio.Event
    ) -> asyncio.Task[None]:
        async def forever() -> None:
            failures = 0
            while not stop.is_set():
                started = time.monotonic()
                try:
                    await body()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # A loop that ran a while before failing starts its backoff afresh.
                    if time.monotonic() - started > RETRY_MAX_S:
                        failures = 0
                    failures += 1
                    if isinstance(exc, RedisError):
                        # One line when Redis goes away, then one every tenth retry.
                        if failures % 10 == 1:
                            log.warning(
                                "loop_redis_error", loop=name, error=str(exc), failures=failures
                            )
                    else:
                        log.exception("loop_error", loop=name)
                    await self._sleep(
                        min(RETRY_MAX_S, RETRY_AFTER_ERROR_S * 2 ** (failures - 1)), stop
                    )

        return asyncio.create_task(forever(), name=f"llmworker-{name}")

    async def _sleep(self, seconds: float, until: asyncio.Event | None = None) -> None:
        """Sleep, or less if ``until`` (the closing event by default) is set."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for((until or self._closing).wait(), seconds)

    async def _claim_forever(self) -> None:
        idle_wait_s = self.settings.lease_ttl_s / 3
        while not self._draining.is_set():
            want = self._want()
            if want <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            # Clear before claiming: a wake that arrives during the claim is kept.
            self._wake.clear()
            pending, want = self._next_claim or (self._claim_soon(want), want)
            self._next_claim = None
            reply = await pending
            claimed = claimed_tasks(reply)
            for task in claimed:
                self._start(task)
            wait_s = claim_wait_s(reply)
            if wait_s is not None:
                self._look_again_in(wait_s)
            if len(claimed) == want:
                continue
            self._waiting = True
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), idle_wait_s)
            finally:
                self._waiting = False

    def _start(self, claimed: Claimed) -> None:
        self.claimed_total += 1
        # The task was requeued while an older run of it still goes on here (its lease
        # lapsed): that run holds no slot any more and must stop.
        self._stop_run(claimed.id, "lease_lost")
        run = Run(claimed.id, claimed.token)
        run.followed = self._early_follows.pop(claimed.id, None) is not None
        self.runs[claimed.id] = run
        run.job = asyncio.create_task(self.executor.run(claimed, run), name=f"task-{claimed.id}")
        run.job.add_done_callback(lambda _job: self._ended(run))

    def _ended(self, run: Run) -> None:
        if self.runs.get(run.task_id) is run:
            del self.runs[run.task_id]
        # The slot this run held is free: try the next task now, not after a round trip.
        self._room.set()
        self._wake.set()

    def _stop_run(self, task_id: str, reason: StopReason, token: str | None = None) -> None:
        """Stop this process's run of a task (only the run with ``token``, if given)."""
        run = self.runs.get(task_id)
        if run is None or (token is not None and run.token != token):
            return
        if run.job is not None and not run.job.done():
            run.stop_reason = reason
            run.job.cancel()
            log.info("run_stopped", task_id=task_id, reason=reason)

    def _followed(self, task_id: str) -> None:
        """A reader follows a task: if it runs here, its run streams from now on."""
        run = self.runs.get(task_id)
        if run is None:
            now = time.monotonic()
            if len(self._early_follows) >= EARLY_FOLLOWS_KEPT:
                self._early_follows = {
                    k: t for k, t in self._early_follows.items() if now - t < EARLY_FOLLOW_S
                }
            self._early_follows[task_id] = now
        elif run.events is None:
            run.followed = True  # its writer, about to be made, starts live
        else:
            run.events.follow()

    async def _listen(self) -> None:
        # Its own client without retries: redis-py would otherwise reconnect and
        # resubscribe inside get_message, silently, and what was published in between
        # would be lost without this loop knowing to look again.
        client = connect(self.settings.redis_url or "", retries=0)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            cancel_channel, follow_channel = self.keys.cancel_channel, self.keys.follow_channel
            await pubsub.subscribe(self.keys.wake_channel, cancel_channel, follow_channel)
            # Anything published while we were not subscribed is unknown: look again (a
            # renewal tells which runs were cancelled or followed meanwhile).
            self._wake.set()
            self._renew_now.set()
            while not self._closing.is_set():
                message = await pubsub.get_message(timeout=None)
                if message is None:
                    continue
                if message["channel"] == cancel_channel:
                    self._stop_run(message["data"], "cancelled")
                elif message["channel"] == follow_channel:
                    self._followed(message["data"])
                else:
                    self._wake.set()
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _renew_forever(self) -> None:
        every_s = self.settings.lease_ttl_s / 3
        while not self._closing.is_set():
            self._renew_now.clear()
            live = [r for r in self.runs.values() if r.stop_reason is None]
            runs = {r.task_id: r.token for r in live}
            quiet = {r.task_id for r in live if r.events is not None and not r.events.live}
            renewed = await self.queue.renew(self.replica_id, self.lease_ms, runs, quiet)
            for task_id in renewed.lost:
                # Only the run that was renewed: a newer run of the task may have started.
                self._stop_run(task_id, "lease_lost", runs[task_id])
            for task_id in renewed.followed:
                # Its follow notice was missed (the link was down): it streams now.
                self._followed(task_id)
            await self._sleep(every_s, self._renew_now)

    async def _reap_forever(self) -> None:
        every_s = self.settings.lease_ttl_s / 3
        while not self._closing.is_set():
            result = await self.queue.reap(
                self.settings.max_attempts, self.settings.result_ttl_s, self.lease_ms
            )
            if result.requeued or result.failed:
                log.warning("reaped", requeued=result.requeued, failed=result.failed)
            for tier, model in result.failed_lanes:
                self.executor.metrics.finished(tier, model, "failed")
            wait_s = every_s
            if result.next_lapse_ms is not None:
                # Wake just after the earliest lease lapses, if that comes sooner.
                wait_s = min(every_s, result.next_lapse_ms / 1000 + 0.005)
            await self._sleep(wait_s)
