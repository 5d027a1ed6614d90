"""Quotas and credits per user: what admission reserves, and what the books say.

A user's limits are their own (``PUT /v1/users/{user}/quota``, kept in ``qu:<user>``)
where set, else their task's tier's (``QUOTA_<TIER>_<MEASURE>_PER_<DAY|MONTH>``). Each
day and month of ``QUOTA_TIMEZONE`` is a window holding what the user's tasks used and
what the tasks admitted but not yet finished reserved; a month's windows share one hash
(``q:<user>:m<YYYY-MM>``, lua/_common.lua), so an admission reads two hashes.

- Admission (lua/admit.lua) reserves a task's estimate (one task; its input's tokens
  plus ``max_tokens`` or the model's usual output; their price) in both windows, and
  against the user's credits, in the step that admits it, or refuses: concurrent
  submissions cannot overspend.
- The end of a run (lua/finish.lua, cancel.lua, reap.lua; ``book_run``) settles the
  reservation to what it used: a failure before any token and a cancel in the queue pay
  nothing; a cancelled stream pays what streamed; a run whose replica died pays its
  estimate. A running task is never stopped for its quota.
- Credits (``POST /v1/users/{user}/credits``, ``qu:<user>``): prepaid USD or tokens that
  the user's tasks draw on; once a user holds credits, a task needs enough of them left.

Money is counted in nano-USD, whole numbers (``usage.NANO``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from redis.asyncio import Redis

from llmworker.errors import InsufficientCredits, InvalidField, QuotaExceeded, TaskOverQuota
from llmworker.keys import Keys
from llmworker.scripts import Scripts
from llmworker.settings import Settings
from llmworker.settings.quotas import LIMITS, parse_limit
from llmworker.usage import NANO

# How long a window outlives its day or month: a task admitted in it may settle later.
WINDOW_GRACE_S = 2 * 86400
# How long a credit top-up's reference is remembered (a payment webhook's retries).
CREDIT_REFERENCE_TTL_S = 90 * 86400


@dataclass(frozen=True)
class Books:
    """The quota windows and the ledger's day, now, in ``QUOTA_TIMEZONE``."""

    day: str
    month: str
    day_ends: datetime
    month_ends: datetime
    retention_s: int
    now: datetime

    @property
    def arg(self) -> str:
        """As the scripts take them (lua/_common.lua)."""
        return (
            f"{self.day} {self.month} {self.expires(self.day_ends)} "
            f"{self.expires(self.month_ends)} {self.retention_s}"
        )

    @staticmethod
    def expires(end: datetime) -> int:
        return int(end.timestamp()) + WINDOW_GRACE_S

    def resets_in_s(self, limit: str) -> int:
        end = self.day_ends if limit.endswith("_day") else self.month_ends
        # Timestamps, not wall clocks: a day with a change of clocks is 23 or 25 hours.
        return max(1, math.ceil(end.timestamp() - self.now.timestamp()))


class Calendar:
    """Days and months of ``QUOTA_TIMEZONE``; the ledger is kept ``retention_days``."""

    def __init__(self, timezone: str = "UTC", retention_days: int = 30) -> None:
        self.zone = ZoneInfo(timezone)
        self.retention_s = retention_days * 86400
        self._second, self._arg = 0, ""

    @classmethod
    def of(cls, settings: Settings) -> Calendar:
        return cls(settings.quota_timezone, settings.ledger_retention_days)

    def books(self, at: datetime | None = None) -> Books:
        now = (at or datetime.now(UTC)).astimezone(self.zone)
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        # Midnight in the zone, wherever a change of clocks puts it.
        day_ends = (start + timedelta(days=1, hours=3)).replace(hour=0)
        month_ends = (start.replace(day=28) + timedelta(days=4)).replace(day=1)
        return Books(
            day=f"d{now:%Y-%m-%d}",
            month=f"m{now:%Y-%m}",
            day_ends=day_ends,
            month_ends=month_ends,
            retention_s=self.retention_s,
            now=now,
        )

    def day(self, at: datetime | None = None) -> str:
        """Today in the zone, YYYY-MM-DD."""
        return self.books(at).day[1:]

    def books_arg(self) -> str:
        """:attr:`Books.arg` now, worked out once a second."""
        second = int(time.time())
        if second != self._second:
            self._second, self._arg = second, self.books().arg
        return self._arg


def terms(
    books: Books,
    limits: dict[str, float],
    est_in: int,
    max_out: int,
    unit_prices: tuple[float, float],
) -> str:
    """What admit.lua checks a task against: the windows (day, month, when the month's
    hash expires), the task's estimate (its input tokens; its max_tokens, 0 for the
    model's usual output; nano-USD per input and output token) and its tier's limits
    (-1: none; USD in nano-USD)."""
    values = []
    for name in LIMITS:
        limit = limits.get(name)
        if limit is None:
            values.append("-1")
        else:
            values.append(str(round(limit * NANO) if name.startswith("usd") else int(limit)))
    return (
        f"{books.day} {books.month} {Books.expires(books.month_ends)} {est_in} {max_out} "
        f"{unit_prices[0]!r} {unit_prices[1]!r} " + " ".join(values)
    )


def refusal(reply: list[Any], books: Books, bounded: bool) -> Exception:
    """The error for admit.lua's ``quota`` or ``credits`` answer; ``bounded``: the task
    named its output's bound (max_tokens)."""
    if reply[0] == "quota":
        name, limit, taken, need = str(reply[1]), int(reply[2]), int(reply[3]), int(reply[4])
        if need > limit:
            # Refused after the reset too: the task itself is the problem.
            return TaskOverQuota(name, _shown(name, limit), _shown(name, need), bounded)
        return QuotaExceeded(
            name, _shown(name, limit), _shown(name, taken), _shown(name, need),
            books.resets_in_s(name),
        )  # fmt: skip
    unit, left, need = str(reply[1]), int(reply[2]), int(reply[3])
    if unit == "usd":
        return InsufficientCredits(unit, max(0, left) / NANO, need / NANO)
    return InsufficientCredits(unit, max(0, left), need)


def _shown(name: str, value: int) -> float:
    return value / NANO if name.startswith("usd") else value


def read_limits(body: Any) -> dict[str, float]:
    """A user's own limits from a ``PUT /v1/users/{user}/quota`` body: the limit names,
    each a number or null (the tier's limit)."""
    if not isinstance(body, dict):
        raise InvalidField("body", "The body must be a JSON object of limits.")
    limits: dict[str, float] = {}
    for name, raw in body.items():
        if name not in LIMITS:
            raise InvalidField(
                name, f"Unknown limit {name[:60]!r}; the limits are: {', '.join(LIMITS)}."
            )
        if raw is None:
            continue
        if isinstance(raw, str):
            raise InvalidField(name, f"{name} must be a number (or null for the tier's limit).")
        value = parse_limit(name, raw)
        if isinstance(value, str):
            raise InvalidField(name, f"{name} {value} (or null for the tier's limit).")
        limits[name] = value
    return limits


class Quotas:
    """The admin side: users' own limits, credits, and what a user has left."""

    def __init__(
        self, redis: Redis, keys: Keys, scripts: Scripts, settings: Settings, calendar: Calendar
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = scripts
        self.settings = settings
        self.calendar = calendar

    def _user_key(self, user: str) -> str:
        return f"{self.keys.base}qu:{user}"

    def _window_key(self, user: str, month: str) -> str:
        return f"{self.keys.base}q:{user}:{month}"

    async def set_own(self, user: str, limits: dict[str, float]) -> None:
        """Replace the user's own limits (none left: the tier's apply again)."""
        stored = {
            name: str(round(v * NANO) if name.startswith("usd") else int(v))
            for name, v in limits.items()
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self._user_key(user), *LIMITS)
        if stored:
            pipe.hset(self._user_key(user), mapping=stored)
        await pipe.execute()

    async def add_credits(self, user: str, usd: float, tokens: int, reference: str) -> bool:
        """Add credit once per ``reference``; whether it was added now."""
        # Whole numbers as text: the script adds them with HINCRBY as given.
        reply = await self.scripts.call(
            "credits", user, str(round(usd * NANO)), str(tokens), reference,
            CREDIT_REFERENCE_TTL_S,
        )  # fmt: skip
        return bool(int(reply[0]))

    async def view(self, user: str, tier: str, shown_user: str) -> dict[str, Any]:
        """Limits (the user's own over ``tier``'s), used, reserved and remaining, today
        and this month, and credits."""
        books = self.calendar.books()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self._user_key(user))
        pipe.hmget(self._window_key(user, books.month), [books.day, books.month])
        # One hash holds the user's own limits and credits.
        own_raw, (day_raw, month_raw) = await pipe.execute()
        tier_limits = self.settings.quotas.get(tier, {})
        own = {n: _shown(n, int(v)) for n, v in own_raw.items() if n in LIMITS}
        windows: dict[str, Any] = {}
        for period, raw, window, ends in (
            ("day", day_raw, books.day, books.day_ends),
            ("month", month_raw, books.month, books.month_ends),
        ):
            packed = [int(v) for v in (raw or "0 0 0 0 0 0").split()]
            used = _measures(packed[:3])
            reserved = _measures(packed[3:])
            limits: dict[str, float | None] = {}
            remaining: dict[str, float | None] = {}
            for measure in ("tasks", "tokens", "usd"):
                name = f"{measure}_per_{period}"
                limit = own.get(name, tier_limits.get(name))
                limits[measure] = limit
                left = None if limit is None else max(0, limit - used[measure] - reserved[measure])
                remaining[measure] = left if left is None or measure != "usd" else round(left, 9)
            windows[period] = {
                "window": window[1:],
                "resets_at": ends.astimezone(UTC).isoformat().replace("+00:00", "Z"),
                "limits": limits,
                "used": used,
                "reserved": reserved,
                "remaining": remaining,
            }
        credits = None
        if "nusd" in own_raw or "tokens" in own_raw:
            credits = {}
            for unit, field, scale in (("usd", "nusd", NANO), ("tokens", "tokens", 1)):
                if field in own_raw:
                    balance = int(own_raw[field]) / scale
                    held = int(own_raw.get("r_" + field, 0)) / scale
                    credits[unit] = {
                        "balance": round(balance, 9) if scale > 1 else int(balance),
                        "reserved": round(held, 9) if scale > 1 else int(held),
                        "available": round(balance - held, 9) if scale > 1 else int(balance - held),
                    }
        return {
            "user": shown_user,
            "tier": tier,
            "timezone": self.settings.quota_timezone,
            "own_limits": own,
            **windows,
            "credits": credits,
        }


def _measures(values: list[int]) -> dict[str, Any]:
    tasks, tokens, nusd = values
    return {"tasks": tasks, "tokens": tokens, "usd": nusd / NANO}
