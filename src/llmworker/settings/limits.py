"""Limits read from name families: ``MAX_<MODEL>_<TIER>``, ``MAX_<MODEL>``,
``MAX_USER_<TIER>``, ``QUEUE_MAX_<TIER>`` and ``TIER_WEIGHT_<TIER>``."""

from __future__ import annotations

from typing import Any

from llmworker.settings.providers import ModelAlias, env_token

# Defaults when the environment names no limit: generous for paid, modest for free.
DEFAULT_MODEL_LIMIT = {"paid": 10, "free": 3}
DEFAULT_USER_LIMIT = {"paid": 5, "free": 1}
DEFAULT_QUEUE_MAX = {"paid": 1000, "free": 200}
DEFAULT_TIER_WEIGHT = {"paid": 4, "free": 1}
FALLBACK_MODEL_LIMIT = 3
FALLBACK_USER_LIMIT = 1
FALLBACK_QUEUE_MAX = 100


def positive_int(name: str, raw: str, problems: list[str], *, minimum: int = 0) -> int | None:
    try:
        value = int(raw.strip())
    except ValueError:
        problems.append(f"{name}={raw!r} is not a whole number")
        return None
    if value < minimum:
        problems.append(f"{name}={value} must be at least {minimum}")
        return None
    return value


def read_limits(
    env: dict[str, str],
    declared: set[str],
    tiers: list[str],
    models: dict[str, ModelAlias],
    problems: list[str],
) -> dict[str, Any]:
    tier_suffixes = {f"_{env_token(t)}": t for t in tiers}
    users = {t: DEFAULT_USER_LIMIT.get(t, FALLBACK_USER_LIMIT) for t in tiers}
    caps = {t: DEFAULT_QUEUE_MAX.get(t, FALLBACK_QUEUE_MAX) for t in tiers}
    weights = {t: DEFAULT_TIER_WEIGHT.get(t, 1) for t in tiers}
    # Families named <PREFIX><TIER>: where each goes and its smallest value.
    per_tier: dict[str, tuple[dict[str, int], int]] = {
        "QUEUE_MAX_": (caps, 0),
        "TIER_WEIGHT_": (weights, 1),
        "MAX_USER_": (users, 1),
    }
    per_model = _ModelLimits(tiers, tier_suffixes, models, problems)
    for var, raw in sorted(env.items()):
        if var.lower() in declared:
            continue
        prefix = next((p for p in per_tier if var.startswith(p)), None)
        if prefix is not None:
            target, minimum = per_tier[prefix]
            tier = tier_suffixes.get("_" + var.removeprefix(prefix))
            if tier is None:
                problems.append(
                    f"{var} names tier {var.removeprefix(prefix).lower()!r}, "
                    f"which is not in TIERS ({', '.join(tiers)})"
                )
            value = positive_int(var, raw, problems, minimum=minimum)
            if tier and value is not None:
                target[tier] = value
        elif var.startswith("MAX_") and len(var) > 4:
            per_model.add(var, raw)
    return {
        "model_limits": per_model.limits,
        "model_total_limits": per_model.totals,
        "user_limits": users,
        "queue_caps": caps,
        "tier_weights": weights,
    }


class _ModelLimits:
    """``MAX_<MODEL>_<TIER>`` (slots per model and tier) and ``MAX_<MODEL>`` (total)."""

    def __init__(
        self,
        tiers: list[str],
        tier_suffixes: dict[str, str],
        models: dict[str, ModelAlias],
        problems: list[str],
    ) -> None:
        self.tiers = tiers
        self.tier_suffixes = tier_suffixes
        self.models = models
        self.by_env = {m.env_name: a for a, m in models.items()}
        self.problems = problems
        self.limits = {
            a: {t: DEFAULT_MODEL_LIMIT.get(t, FALLBACK_MODEL_LIMIT) for t in tiers} for a in models
        }
        self.totals: dict[str, int] = {}

    def add(self, var: str, raw: str) -> None:
        stem = var.removeprefix("MAX_")
        value = positive_int(var, raw, self.problems)
        if stem in self.by_env:
            if value is not None:
                self.totals[self.by_env[stem]] = value
            return
        suffix = next((s for s in self.tier_suffixes if stem.endswith(s)), None)
        alias = self.by_env.get(stem[: -len(suffix)]) if suffix else None
        if suffix is None or alias is None:
            known = ", ".join(sorted(self.models))
            self.problems.append(
                f"{var} matches no model alias and tier "
                f"(models: {known}; tiers: {', '.join(self.tiers)})"
            )
        elif value is not None:
            self.limits[alias][self.tier_suffixes[suffix]] = value
