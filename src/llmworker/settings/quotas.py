"""Quotas per user, by tier: ``QUOTA_<TIER>_<MEASURE>_PER_<DAY|MONTH>``.

``MEASURE`` is ``TASKS``, ``TOKENS`` (input and output) or ``USD``; ``QUOTA_FREE_TASKS_PER_DAY=20``
lets each free user start 20 tasks a day. Days and months are those of ``QUOTA_TIMEZONE``.
A user's own limits (``PUT /v1/users/{user}/quota``) replace their tier's (quotas.py).
"""

from __future__ import annotations

from llmworker.settings.providers import env_token

# The largest limit: counts in Redis stay exact far past it (USD as nano-USD: 10^21).
MAX_LIMIT = 1e12
# Limit names, in the order the admission script takes them (lua/admit.lua).
LIMITS = (
    "tasks_per_day",
    "tokens_per_day",
    "usd_per_day",
    "tasks_per_month",
    "tokens_per_month",
    "usd_per_month",
)


def read_quotas(
    env: dict[str, str], declared: set[str], tiers: list[str], problems: list[str]
) -> dict[str, dict[str, float]]:
    """tier -> limit name -> limit (USD as a float, the others whole)."""
    by_token = {env_token(t): t for t in tiers}
    quotas: dict[str, dict[str, float]] = {}
    for var, raw in sorted(env.items()):
        if not var.startswith("QUOTA_") or var.lower() in declared:
            continue
        stem = var.removeprefix("QUOTA_")
        found = next(
            ((by_token[token], name) for token in by_token for name in LIMITS
             if stem == f"{token}_{name.upper()}"),
            None,
        )  # fmt: skip
        if found is None:
            problems.append(
                f"{var} is not QUOTA_<TIER>_<TASKS|TOKENS|USD>_PER_<DAY|MONTH> with a tier of "
                f"TIERS ({', '.join(tiers)}), e.g. QUOTA_{env_token(tiers[0]) if tiers else 'FREE'}"
                "_TASKS_PER_DAY=20"
            )
            continue
        tier, name = found
        value = parse_limit(name, raw.strip())
        if isinstance(value, str):
            problems.append(f"{var}={raw!r} {value}")
        else:
            quotas.setdefault(tier, {})[name] = value
    return quotas


def parse_limit(name: str, raw: object) -> float | str:
    """A limit's value (USD a float, the others whole), or what is wrong with it."""
    usd = name.startswith("usd")
    value: float | None = None
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            value = None
    if value is None or not 0 <= value <= MAX_LIMIT or (not usd and value != int(value)):
        if usd:
            return f"must be a number of USD from 0 to {MAX_LIMIT:.0e}"
        return f"must be a whole number from 0 to {MAX_LIMIT:.0e}"
    return value if usd else int(value)
