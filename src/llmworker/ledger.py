"""The ledger: what every finished attempt used and cost, and its daily totals.

The scripts write it (lua/_common.lua, ``book_run``) in the step that records a run's
end, so it never misses or doubles one:

- ``ledger``: a stream with one entry per finished attempt (task, tenant, user, tier,
  kind, model, status, tokens by type, cost in USD, price source, whether estimated),
  kept ``LEDGER_RETENTION_DAYS``;
- ``ld:<day>``: totals per tier, model and user for a day of ``QUOTA_TIMEZONE``, and
  ``lt:<day>`` the same per tier and model (what the dashboard shows), kept as long.

This module reads them: totals grouped by day, model, tier or user, and the entries.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from redis.asyncio import Redis

from llmworker.auth import unscoped
from llmworker.keys import Keys
from llmworker.quotas import Calendar
from llmworker.record import iso_ms
from llmworker.usage import NANO

GROUPS = ("day", "model", "tier", "user")
# The most days one question may span, and entries one answer may hold.
MAX_DAYS = 400
MAX_ENTRIES = 10_000
# Measures of the daily totals, and their names in an answer.
TOKEN_MEASURES = {"in": "input", "cin": "cached_input", "out": "output", "rsn": "reasoning"}


@dataclass
class Totals:
    attempts: int = 0
    tasks: int = 0
    tokens: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(TOKEN_MEASURES.values(), 0)
    )
    nusd: int = 0
    unpriced: int = 0

    def add(self, measure: str, value: int) -> None:
        if measure == "n":
            self.attempts += value
        elif measure == "t":
            self.tasks += value
        elif measure == "nusd":
            self.nusd += value
        elif measure == "unp":
            self.unpriced += value
        elif measure in TOKEN_MEASURES:
            self.tokens[TOKEN_MEASURES[measure]] += value

    def view(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "tasks": self.tasks,
            "tokens": dict(self.tokens),
            "cost_usd": round(self.nusd / NANO, 9),
            "unpriced_attempts": self.unpriced,
        }


@dataclass(frozen=True)
class Scope:
    """Whose usage a question may see: one tenant's users, or (None) everyone's."""

    tenant: str | None

    def sees(self, user: str) -> bool:
        return self.tenant is None or user.startswith(self.tenant + "/")

    def shown(self, user: str) -> str:
        return user if self.tenant is None else unscoped(self.tenant, user)


def days_between(first: date, last: date) -> list[str]:
    return [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


class Ledger:
    def __init__(self, redis: Redis, keys: Keys, calendar: Calendar) -> None:
        self.redis = redis
        self.keys = keys
        self.calendar = calendar

    async def _days(self, prefix: str, days: Iterable[str]) -> list[tuple[str, dict[str, str]]]:
        days = list(days)
        pipe = self.redis.pipeline(transaction=False)
        for day in days:
            pipe.hgetall(f"{self.keys.base}{prefix}:d{day}")
        return list(zip(days, await pipe.execute(), strict=True))

    async def totals(
        self,
        days: list[str],
        scope: Scope,
        group_by: str = "day",
        user: str = "",
        tier: str = "",
        model: str = "",
    ) -> dict[str, Any]:
        """Totals over ``days`` (YYYY-MM-DD), filtered and grouped; ``user``: as stored."""
        # Without a user to filter or group by, the totals per tier and model suffice.
        per_user = bool(user) or group_by == "user" or scope.tenant is not None
        # By day, every day of the range has its row, quiet ones too (a chart's x axis).
        groups: dict[str, Totals] = {day: Totals() for day in days} if group_by == "day" else {}
        total = Totals()
        for day, raw in await self._days("ld" if per_user else "lt", days):
            for name, value in raw.items():
                parts = name.split("|", 3)
                measure, t, m = parts[0], parts[1], parts[2]
                u = parts[3] if len(parts) > 3 else ""
                if (tier and t != tier) or (model and m != model) or (user and u != user):
                    continue
                if per_user and not scope.sees(u):
                    continue
                key = {"day": day, "model": m, "tier": t}.get(group_by) or scope.shown(u)
                n = int(value)
                groups.setdefault(key, Totals()).add(measure, n)
                total.add(measure, n)
        rows = [{group_by: key, **t.view()} for key, t in sorted(groups.items())]
        return {
            "from": days[0],
            "to": days[-1],
            "timezone": str(self.calendar.zone),
            "group_by": group_by,
            "rows": rows,
            "total": total.view(),
        }

    async def today(self) -> dict[str, Any]:
        """Today's cost and tokens per tier and model (the dashboard, /v1/stats)."""
        day = self.calendar.day()
        lanes: dict[tuple[str, str], Totals] = {}
        total = Totals()
        for _day, raw in await self._days("lt", [day]):
            for name, value in raw.items():
                measure, tier, model = name.split("|", 2)
                lanes.setdefault((tier, model), Totals()).add(measure, int(value))
                total.add(measure, int(value))
        return {
            "day": day,
            "timezone": str(self.calendar.zone),
            "cost_usd": total.view()["cost_usd"],
            "lanes": [
                {"tier": tier, "model": model, **t.view()}
                for (tier, model), t in sorted(lanes.items())
            ],
        }

    async def entries(
        self,
        first: date,
        last: date,
        scope: Scope,
        user: str = "",
        tier: str = "",
        model: str = "",
        limit: int = MAX_ENTRIES,
    ) -> list[dict[str, Any]]:
        """The entries of the days ``first`` to ``last``, oldest first, filtered."""
        zone = self.calendar.zone
        start = datetime(first.year, first.month, first.day, tzinfo=zone)
        end = datetime(last.year, last.month, last.day, tzinfo=zone) + timedelta(days=1)
        low, high = int(start.timestamp() * 1000), int(end.timestamp() * 1000) - 1
        found: list[dict[str, Any]] = []
        cursor = str(low)
        while len(found) < limit:
            batch = await self.redis.xrange(
                f"{self.keys.base}ledger", cursor, str(high), count=min(1000, limit)
            )
            for _entry_id, e in batch:
                if (
                    (user and e.get("user") != user)
                    or (tier and e.get("tier") != tier)
                    or (model and e.get("model") != model)
                    or not scope.sees(e.get("user", ""))
                ):
                    continue
                found.append(_entry(e, scope))
                if len(found) >= limit:
                    break
            if len(batch) < min(1000, limit):
                break
            cursor = "(" + batch[-1][0]
        return found


def _entry(e: dict[str, str], scope: Scope) -> dict[str, Any]:
    usd = e.get("usd", "")
    return {
        "at": iso_ms(int(e["at"])),
        "day": e.get("day", "")[1:],
        "task": e.get("task", "").rpartition("/")[2],
        "tenant": e.get("tenant") or "default",
        "user": scope.shown(e.get("user", "")),
        "tier": e.get("tier", ""),
        "kind": e.get("kind", ""),
        "model": e.get("model", ""),
        "status": e.get("status", ""),
        "tokens": {name: int(e.get(m) or 0) for m, name in TOKEN_MEASURES.items()},
        "cost_usd": float(usd) if usd else None,
        "price_source": e.get("src") or None,
        "estimated": e.get("est") == "1",
    }
