"""Guards: distributed counting semaphores whose slots are leases.

Each guard is a sorted set: one member per run holding a slot (the run token
``<task id>:<run>``), scored by the lease's expiry in Redis server milliseconds. A
claim (``lua/claim.lua``) prunes expired members, checks every guard a task needs and
only then adds the token to all of them; a run renews its leases (``lua/renew.lua``)
every third of ``LEASE_TTL_S``; a release removes exactly that token, so a stray or
repeated release frees nothing else. A dead holder's slots return when its leases lapse.

The guards of a task:

- ``guardModel``: per model alias and tier, limit ``MAX_<MODEL>_<TIER>``;
- the model's total over all tiers, limit ``MAX_<MODEL>`` (only when set);
- ``guardUser``: per user, limit ``MAX_USER_<TIER>`` of the task's tier.

This module turns the settings into what the scripts take, and reads guard usage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from llmworker.keys import Keys
from llmworker.settings import Settings


def smooth_schedule(weights: dict[str, int]) -> list[str]:
    """Nginx's smooth weighted round robin over one cycle: {'paid': 4, 'free': 1} gives
    paid, paid, free, paid, paid, so the lighter tier is spread out, never starved."""
    current = dict.fromkeys(weights, 0)
    total = sum(weights.values())
    order: list[str] = []
    for _ in range(total):
        for name, weight in weights.items():
            current[name] += weight
        pick = max(current, key=lambda name: current[name])
        current[pick] -= total
        order.append(pick)
    return order


@dataclass(frozen=True)
class GuardPlan:
    """The limits and the tier schedule, in the form the claim script takes."""

    schedule: str
    ranked: str
    limit_args: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> GuardPlan:
        tiers = settings.tier_names
        available = set(settings.available_models)
        args: list[str] = []
        for model, per_tier in settings.model_limits.items():
            if model not in available:
                continue
            for tier in tiers:
                args += [f"m:{tier}:{model}", str(per_tier.get(tier, 0))]
        for model, total in settings.model_total_limits.items():
            args += [f"t:{model}", str(total)]
        for tier, limit in settings.user_limits.items():
            args += [f"u:{tier}", str(limit)]
        weights = {t: settings.tier_weights[t] for t in tiers}
        ranked = sorted(tiers, key=lambda t: -weights[t])
        return cls(
            schedule=" ".join(smooth_schedule(weights)),
            ranked=" ".join(ranked),
            limit_args=tuple(args),
        )


async def guard_usage(redis: Redis, keys: Keys, settings: Settings) -> dict[str, Any]:
    """Slots in use (live leases only) and limits of every model guard, per tier."""
    now_s, now_us = await redis.time()
    now_ms = now_s * 1000 + now_us // 1000
    pipe = redis.pipeline(transaction=False)
    names: list[tuple[str, str | None]] = []
    for model in settings.available_models:
        tier: str | None
        for tier in settings.tier_names:
            pipe.zcount(keys.guard_model(model, tier), f"({now_ms}", "+inf")
            names.append((model, tier))
        if model in settings.model_total_limits:
            pipe.zcount(keys.guard_model_total(model), f"({now_ms}", "+inf")
            names.append((model, None))
    counts = await pipe.execute()
    usage: dict[str, Any] = {}
    for (model, guard_tier), used in zip(names, counts, strict=True):
        entry = usage.setdefault(model, {"tiers": {}})
        if guard_tier is None:
            entry["total"] = {"in_use": used, "limit": settings.model_total_limits[model]}
        else:
            entry["tiers"][guard_tier] = {
                "in_use": used,
                "limit": settings.model_limit(model, guard_tier),
            }
    return usage
