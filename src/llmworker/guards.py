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

Besides the guards, a claim checks what the model's provider allows now: its hold and
circuit, its adaptive cap (over all tiers) and its RPM/TPM windows (``lua/claim.lua``).

This module turns the settings into what the scripts take (observe/snapshot.py reads
the slots in use).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmworker.settings import Settings

# A task's output, in tokens, as TPM_* reserves it before the model's usual output is
# learned (when the task names no max_tokens).
DEFAULT_OUTPUT_TOKENS = 512


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
        args += _provider_args(settings, available)
        weights = {t: settings.tier_weights[t] for t in tiers}
        ranked = sorted(tiers, key=lambda t: -weights[t])
        return cls(
            schedule=" ".join(smooth_schedule(weights)),
            ranked=" ".join(ranked),
            limit_args=tuple(args),
        )


def _provider_args(settings: Settings, available: set[str]) -> list[str]:
    """What the claim checks of the providers: RPM/TPM windows, adaptive caps (and the
    first cap of a model that adapts to latency), spill-over."""
    args: list[str] = []
    rates = settings.rates
    for name, family in (("r", rates.rpm), ("k", rates.tpm)):
        for model, per_tier in family.items():
            if model not in available:
                continue
            for tier, limit in per_tier.items():
                args += [f"{name}:{model}" + (f":{tier}" if tier else ""), str(limit)]
    args += ["w", str(int(settings.rate_window_s * 1000)), "o", str(DEFAULT_OUTPUT_TOKENS)]
    if settings.adaptive_caps:
        args += ["a", "1"]
        latency = settings.latency_providers
        for model in sorted(available):
            if settings.models[model].provider in latency:
                # As adapt.lua starts it: a quarter of the top, at least the floor.
                top = settings.model_ceiling(model)
                args += [f"l:{model}", str(min(top, max(rates.floor(model), -(-top // 4))))]
    if settings.spill_after_s is not None:
        args += ["s", str(int(settings.spill_after_s * 1000))]
    return args
