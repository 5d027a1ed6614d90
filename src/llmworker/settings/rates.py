"""What providers allow, and where a task may go, read from name families:

- ``RPM_<MODEL>`` / ``RPM_<MODEL>_<TIER>``  requests per minute (over all tiers / per tier)
- ``TPM_<MODEL>`` / ``TPM_<MODEL>_<TIER>``  tokens per minute (the same)
- ``MIN_<MODEL>``                          the adaptive cap's floor (default 1)
- ``CONTEXT_<MODEL>``                      the model's context window, in tokens
- ``ROUTE_<KIND>_<TIER>``                  the models, in order, for a kind and tier
  (``ROUTE_SUMMARY_PAID=ds-reasoner,ds-chat``)
- ``PRICE_<MODEL>``                        what the model costs: ``<input>,<output>[,<cached
  input>]`` USD per million tokens (over the genai-prices package's price; usage.py)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmworker.settings.limits import positive_int
from llmworker.settings.providers import ModelAlias, env_token

# Context windows of the built-in aliases (tokens), as their providers publish them.
DEFAULT_CONTEXT = {
    "ds-chat": 128_000,
    "ds-reasoner": 128_000,
    "gemini-flash": 1_048_576,
    "glm-flash": 128_000,
    "gpt": 128_000,
}

FAMILIES = ("RPM_", "TPM_", "MIN_", "CONTEXT_", "ROUTE_", "PRICE_")


@dataclass(frozen=True)
class Rates:
    """The per-model rate limits, adaptive floors, context sizes and routes."""

    # model -> tier ('' for all tiers) -> limit
    rpm: dict[str, dict[str, int]] = field(default_factory=dict)
    tpm: dict[str, dict[str, int]] = field(default_factory=dict)
    floors: dict[str, int] = field(default_factory=dict)
    contexts: dict[str, int] = field(default_factory=dict)
    # (kind as in env names, tier) -> models in order
    routes: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    # model -> USD per million input, output and cached input tokens (None: as input)
    prices: dict[str, tuple[float, float, float | None]] = field(default_factory=dict)

    def floor(self, model: str) -> int:
        return self.floors.get(model, 1)

    def context(self, model: str) -> int | None:
        return self.contexts.get(model, DEFAULT_CONTEXT.get(model))

    def route(self, kind: str, tier: str) -> tuple[str, ...] | None:
        return self.routes.get((env_token(kind), tier))


def read_rates(
    env: dict[str, str],
    tiers: list[str],
    models: dict[str, ModelAlias],
    problems: list[str],
) -> Rates:
    by_env = {m.env_name: a for a, m in models.items()}
    tier_by_env = {env_token(t): t for t in tiers}
    rates = Rates()

    def model_and_tier(var: str, stem: str) -> tuple[str, str] | None:
        """``DS_CHAT`` -> (ds-chat, ''); ``DS_CHAT_PAID`` -> (ds-chat, paid)."""
        if stem in by_env:
            return by_env[stem], ""
        for token, tier in tier_by_env.items():
            if stem.endswith("_" + token) and stem[: -len(token) - 1] in by_env:
                return by_env[stem[: -len(token) - 1]], tier
        problems.append(
            f"{var} matches no model alias (and tier): models {', '.join(sorted(models))}; "
            f"tiers {', '.join(tiers)}"
        )
        return None

    for var, raw in sorted(env.items()):
        prefix = next((p for p in FAMILIES if var.startswith(p) and len(var) > len(p)), None)
        if prefix is None:
            continue
        stem = var.removeprefix(prefix)
        if prefix == "ROUTE_":
            _read_route(var, stem, raw, tier_by_env, models, rates, problems)
            continue
        if prefix in ("RPM_", "TPM_"):
            found = model_and_tier(var, stem)
            value = positive_int(var, raw, problems, minimum=1)
            if found and value is not None:
                target = rates.rpm if prefix == "RPM_" else rates.tpm
                target.setdefault(found[0], {})[found[1]] = value
            continue
        alias = by_env.get(stem)
        if alias is None:
            problems.append(f"{var} matches no model alias ({', '.join(sorted(models))})")
            continue
        _read_model_value(var, prefix, alias, raw, rates, problems)
    return rates


def _read_model_value(
    var: str, prefix: str, alias: str, raw: str, rates: Rates, problems: list[str]
) -> None:
    """``MIN_``, ``CONTEXT_`` and ``PRICE_`` of one model."""
    if prefix == "PRICE_":
        price = _read_price(var, raw, problems)
        if price is not None:
            rates.prices[alias] = price
        return
    value = positive_int(var, raw, problems, minimum=1)
    if value is not None:
        (rates.floors if prefix == "MIN_" else rates.contexts)[alias] = value


def _read_route(
    var: str,
    stem: str,
    raw: str,
    tier_by_env: dict[str, str],
    models: dict[str, ModelAlias],
    rates: Rates,
    problems: list[str],
) -> None:
    tier = next((t for token, t in tier_by_env.items() if stem.endswith("_" + token)), None)
    kind = stem[: -len(env_token(tier)) - 1] if tier else ""
    if tier is None or not kind:
        problems.append(
            f"{var} must be ROUTE_<KIND>_<TIER> with a tier of TIERS ({', '.join(tier_by_env.values())})"
        )
        return
    chosen = tuple(m.strip() for m in raw.split(",") if m.strip())
    unknown = [m for m in chosen if m not in models]
    if not chosen or unknown:
        problems.append(
            f"{var}={raw!r} must list model aliases, first choice first "
            f"(unknown: {', '.join(unknown) or 'none given'}; known: {', '.join(sorted(models))})"
        )
    elif len(set(chosen)) != len(chosen):
        problems.append(f"{var}={raw!r} names a model twice")
    else:
        rates.routes[(kind, tier)] = chosen


def _read_price(
    var: str, raw: str, problems: list[str]
) -> tuple[float, float, float | None] | None:
    parts = [p.strip() for p in raw.split(",")]
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (2, 3) or not all(0 <= n < 1e6 for n in numbers):
        problems.append(
            f"{var}={raw!r} must be <input>,<output>[,<cached input>] USD per million tokens, "
            "e.g. 0.27,1.10,0.07"
        )
        return None
    return numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else None
