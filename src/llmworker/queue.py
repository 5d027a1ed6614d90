"""The durable queue: admission, claims, outcomes and requeues, each one Lua script.

Every change that touches more than one key runs as one script (``lua/``), so replicas
sharing a Redis never see half a change and never both take the last slot. This class
only marshals arguments; the semantics live in the scripts' headers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from redis.asyncio import Redis

from llmworker.guards import GuardPlan
from llmworker.keys import Keys
from llmworker.quotas import Calendar
from llmworker.scripts import Scripts, fields_of


@dataclass(frozen=True)
class Admission:
    outcome: Literal["created", "exists", "full", "refused"]
    task_id: str
    waiting: int = 0
    created_at_ms: int = 0
    # refused: admit.lua's answer (a quota used up, or credits short; quotas.refusal)
    refusal: tuple[Any, ...] = ()


@dataclass(frozen=True)
class ReapResult:
    requeued: int
    failed: int
    next_lapse_ms: int | None
    # (tier, model) of each task failed for having used MAX_ATTEMPTS
    failed_lanes: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Claimed:
    """A task as claimed: its record fields, and the run token that holds its slots."""

    fields: dict[str, str]

    @property
    def id(self) -> str:
        return self.fields["id"]

    @property
    def token(self) -> str:
        return self.fields["token"]

    @property
    def input(self) -> Any:
        return orjson.loads(self.fields.get("input") or "null")


def claimed_tasks(reply: list[Any]) -> list[Claimed]:
    """The tasks of a claim's reply (see :func:`claim_wait_s` for its first element)."""
    return [Claimed(fields_of(flat)) for flat in reply[1:]]


def claim_wait_s(reply: list[Any]) -> float | None:
    """Seconds until a model that held back waiting tasks (held, circuit open, out of
    requests or tokens) may take them; None when none did."""
    wait = int(reply[0])
    return None if wait < 0 else wait / 1000


@dataclass(frozen=True)
class Renewed:
    """A renewal's news: the runs whose lease was lost (or whose task was cancelled), and
    the quiet runs somebody follows now."""

    lost: list[str]
    followed: list[str]


@dataclass(frozen=True)
class Spent:
    """What a run used, to settle its rate reservations: tokens and output tokens as the
    provider reported them, and its calls (None: unknown)."""

    tokens: int | None = None
    calls: int | None = None
    output: int | None = None

    def args(self) -> list[str]:
        return ["" if v is None else str(v) for v in (self.tokens, self.calls, self.output)]


@dataclass(frozen=True)
class Adjustment:
    """An adaptive cap as adapt.lua left it: ``cap`` None when back at its top."""

    model: str
    cap: int | None
    changed_ms: int
    before: int
    reason: str


class Queue:
    def __init__(
        self, redis: Redis, keys: Keys, timeout_s: float = 10.0, calendar: Calendar | None = None
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = Scripts(redis, keys.base, timeout_s)
        # The books' day and quota windows (QUOTA_TIMEZONE) every end of a run is booked in.
        self.calendar = calendar or Calendar()

    async def _run(self, name: str, *args: Any) -> Any:
        return await self.scripts.call(name, *args)

    async def admit(
        self,
        *,
        task_id: str,
        idempotency_key: str | None,
        kind: str,
        tier: str,
        model: str,
        user: str,
        cap: int,
        lane_limit: int,
        fields: dict[str, str],
        terms: str,
    ) -> Admission:
        """``terms``: the quota's (quotas.terms)."""
        flat: list[str] = []
        for name, value in fields.items():
            flat += [name, value]
        reply = await self._run(
            "admit", task_id, idempotency_key or "", tier, model, user, cap, lane_limit, kind,
            terms, *flat,
        )  # fmt: skip
        outcome = reply[0]
        if outcome == "created":
            return Admission("created", task_id, created_at_ms=int(reply[1]))
        if outcome == "exists":
            return Admission("exists", reply[1])
        if outcome == "full":
            return Admission("full", task_id, waiting=int(reply[1]))
        return Admission("refused", task_id, refusal=tuple(reply))

    async def claim(
        self,
        replica: str,
        n: int,
        lease_ms: int,
        plan: GuardPlan,
        idle_ms: int = 0,
        kinds: str = "*",
    ) -> list[Claimed]:
        """Claim up to ``n`` runnable tasks of ``kinds`` (space separated, ``*``: any).
        ``idle_ms``: how long this replica will wait for a wake if the claim comes back
        short (it is told when work arrives)."""
        return claimed_tasks(await self.claim_soon(replica, n, lease_ms, plan, idle_ms, kinds))

    def claim_soon(
        self,
        replica: str,
        n: int,
        lease_ms: int,
        plan: GuardPlan,
        idle_ms: int = 0,
        kinds: str = "*",
    ) -> asyncio.Future[Any]:
        """:meth:`claim`, queued in the next batch at once (behind a finish queued just
        before it, whose freed slots it sees); the future's reply goes to
        :func:`claimed_tasks`."""
        return self.scripts.call(
            "claim", replica, n, lease_ms, idle_ms, plan.schedule, plan.ranked, kinds,
            *plan.limit_args,
        )  # fmt: skip

    async def finish(self, task_id: str, token: str, status: str, **outcome: Any) -> bool:
        """Record a run's outcome (``result``, ``error``, ``usage`` JSON; ``ttl_s``); False
        when the run was stale (only its slots were freed). ``status=""`` only frees them."""
        return bool(await self.finish_soon(task_id, token, status, **outcome))

    def finish_soon(
        self,
        task_id: str,
        token: str,
        status: str,
        *,
        result: str = "",
        error: str = "",
        usage: str = "",
        ttl_s: int,
        spent: Spent | None = None,
        cost: str = "",
    ) -> asyncio.Future[Any]:
        """:meth:`finish`, queued in the next batch; the future resolves to 1 or 0. A claim
        queued right after it travels in the same round trip and sees the freed slots."""
        return self.scripts.call(
            "finish", task_id, token, status, result, error, usage, ttl_s,
            *(spent or Spent()).args(), cost, self.calendar.books_arg(),
        )  # fmt: skip

    async def release(
        self, task_id: str, token: str, spent: Spent | None = None, cost: str = ""
    ) -> None:
        """Free a stopped run's slots; a run stopped by a cancel books ``cost``."""
        await self._run(
            "finish", task_id, token, "", "", "", "", 1, *(spent or Spent()).args(), cost,
            self.calendar.books_arg(),
        )  # fmt: skip

    async def callback_claim(
        self, n: int, visibility_ms: int
    ) -> tuple[list[dict[str, str]], int, int]:
        """Due callbacks (their task records) for one attempt each; ms until the next one
        is due (-1: the outbox is empty); how many left because their record expired."""
        reply = await self._run("callback_claim", n, visibility_ms)
        records = [fields_of(r) for r in reply[2:]]
        return records, int(reply[0]), int(reply[1])

    async def callback_end(
        self,
        task_id: str,
        attempt: str,
        outcome: Literal["delivered", "published", "retry", "failed"],
        retry_ms: int = 0,
        error: str = "",
    ) -> bool:
        """Record one attempt's outcome; False when a newer attempt has taken over."""
        return bool(await self._run("callback_end", task_id, attempt, outcome, retry_ms, error))

    async def callback_renew(self, visibility_ms: int, attempts: dict[str, str]) -> None:
        """Extend the visibility of callbacks being attempted (task id -> attempt)."""
        flat: list[str] = []
        for task_id, attempt in attempts.items():
            flat += [task_id, attempt]
        await self._run("callback_renew", visibility_ms, *flat)

    async def first_use(self, key: str, ttl_ms: int) -> bool:
        """True the first time ``key`` is used within ``ttl_ms``."""
        return bool(await self.scripts.command("SET", key, "1", "NX", "PX", max(1, ttl_ms)))

    async def handback(self, task_id: str, token: str, cost: str = "") -> bool:
        """Give a running task back to the queue; ``cost``: what the run used (booked)."""
        return bool(await self._run("handback", task_id, token, cost, self.calendar.books_arg()))

    async def hold(self, model: str, wait_ms: int) -> tuple[int, bool]:
        """Hold ``model``'s dispatch for ``wait_ms``: (ms held, whether this lengthened it)."""
        held_ms, longer = await self._run("hold", model, wait_ms)
        return int(held_ms), bool(longer)

    async def pause(self, task_id: str, token: str, model: str, wait_ms: int) -> int | None:
        """Hold ``model``'s dispatch for ``wait_ms`` and give the run's task back to the
        queue; how long the model is held (ms), or None when the run was stale."""
        handed, held_ms = await self._run("pause", task_id, token, model, wait_ms)
        return int(held_ms) if handed else None

    async def fallback(
        self,
        task_id: str,
        token: str,
        candidates: list[str],
        *,
        skip_stopped: bool,
        reason: str,
        code: str,
        hold_ms: int = 0,
    ) -> str | None:
        """Move a running task to the first of ``candidates`` (passing over models held or
        whose circuit is open, if ``skip_stopped``); the model it went to, or None."""
        moved = await self._run(
            "fallback", task_id, token, " ".join(candidates), "1" if skip_stopped else "0",
            reason, code, hold_ms,
        )  # fmt: skip
        return str(moved) if moved else None

    async def open_circuit(self, model: str, ms: int, code: str) -> bool:
        """Open ``model``'s circuit for ``ms``; True if it was closed (a change)."""
        return bool(await self._run("circuit", "open", model, ms, code))

    async def close_circuit(self, model: str, token: str = "") -> bool:
        """Close ``model``'s circuit (only if ``token``'s run was its probe, when given)."""
        return bool(await self._run("circuit", "close", model, token))

    async def probe_ended(self, model: str, token: str) -> bool:
        return bool(await self._run("circuit", "probe_end", model, token))

    async def adapt(self, tiers: str, reports: Sequence[Sequence[str]]) -> list[Adjustment]:
        """Feed each model's calls to its adaptive cap (adapt.lua: eight fields each)."""
        flat = [str(v) for row in reports for v in row]
        reply = await self._run("adapt", tiers, *flat)
        return [
            Adjustment(
                str(reply[i]),
                None if int(reply[i + 1]) < 0 else int(reply[i + 1]),
                int(reply[i + 2]),
                int(reply[i + 3]),
                str(reply[i + 4]),
            )
            for i in range(0, len(reply), 5)
        ]

    async def reap(
        self, max_attempts: int, ttl_s: int, lease_ms: int, limit: int = 100
    ) -> ReapResult:
        reply = await self._run(
            "reap", max_attempts, ttl_s, limit, lease_ms, self.calendar.books_arg()
        )
        requeued, failed, wait, lanes = reply[0], reply[1], reply[2], reply[3] or []
        return ReapResult(
            int(requeued),
            int(failed),
            None if int(wait) < 0 else int(wait),
            tuple(tuple(lane.split("|", 1)) for lane in lanes),
        )

    async def cancel(self, task_id: str, ttl_s: int) -> str | None:
        """Cancel a task; the status it had, or None if unknown."""
        reply = await self._run("cancel", task_id, ttl_s, self.calendar.books_arg())
        return reply if reply else None

    async def renew(
        self, replica: str, lease_ms: int, runs: dict[str, str], quiet: Collection[str] = ()
    ) -> Renewed:
        """Renew the leases of ``runs`` (task id -> run token). ``quiet``: those of them
        keeping their events (nobody followed them, as far as they know)."""
        flat: list[str] = []
        for task_id, token in runs.items():
            flat += [task_id, token, "1" if task_id in quiet else "0"]
        lost, followed = await self._run("renew", replica, lease_ms, *flat)
        return Renewed(list(lost), list(followed))

    async def mark(self, task_id: str, field: str, value: str) -> bool:
        """Set ``field`` on a task's record, if the record still exists."""
        return bool(await self._run("mark", task_id, field, value))

    async def find(self, idempotency_key: str) -> str | None:
        """The id of the task admitted with ``idempotency_key``, while it is kept."""
        found = await self.scripts.command("GET", self.keys.idem(idempotency_key))
        return str(found) if found else None

    async def get(self, task_id: str) -> dict[str, str] | None:
        # Through the batch: a thousand readers looking at once share its connection.
        fields = fields_of(await self.scripts.command("HGETALL", self.keys.task(task_id)))
        return fields if "id" in fields else None

    async def depths(self) -> dict[str, int]:
        raw: dict[str, str] = await self.redis.hgetall(self.keys.depth)  # type: ignore[misc]
        return {k: int(v) for k, v in raw.items()}

    async def replicas_alive(self) -> int:
        now_s, now_us = await self.redis.time()
        now_ms = now_s * 1000 + now_us // 1000
        return int(await self.redis.zcount(self.keys.replicas, f"({now_ms}", "+inf"))

    async def leave(self, replica: str) -> None:
        """A replica that stops: out of the replica and idle lists."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(self.keys.replicas, replica)
        pipe.zrem(self.keys.idle, replica)
        await pipe.execute()
