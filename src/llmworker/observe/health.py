"""Provider health over every replica: requests by outcome, duration and time to first
token, per model, for the dashboard and ``llmworker top``.

Each process counts its calls in memory and adds them to the current minute's counts in
Redis every ``FLUSH_S`` (``lua/health_add.lua``: one call per flush, however many provider
calls there were). Durations are counted in buckets, so percentiles over any replicas and
minutes are a sum of counts; a percentile is read as its bucket's upper bound.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections import Counter
from typing import Any

import structlog
from redis.exceptions import RedisError

from llmworker.scripts import Scripts

log = structlog.get_logger("llmworker.observe")

FLUSH_S = 2.0
# Minutes of history the dashboard shows.
WINDOW_MIN = 15
# Upper bounds (seconds); a call slower than the last falls in an overflow bucket.
BOUNDS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120)
OUTCOMES = ("ok", "rate_limited", "server_error", "timeout", "client_error")


def bucket(seconds: float) -> int:
    return bisect.bisect_left(BOUNDS_S, seconds)


def percentile(counts: dict[int, int], q: float) -> float | None:
    """The upper bound of the bucket holding the ``q`` quantile (the last bound for the
    overflow bucket); None without observations."""
    total = sum(counts.values())
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index in sorted(counts):
        seen += counts[index]
        if seen >= rank:
            return float(BOUNDS_S[min(index, len(BOUNDS_S) - 1)])
    return float(BOUNDS_S[-1])


class ProviderHealth:
    """This process's provider calls not yet added to Redis."""

    def __init__(self, scripts: Scripts) -> None:
        self.scripts = scripts
        # (model, "n" | "d" | "t", outcome or bucket) -> calls
        self.pending: Counter[tuple[str, str, Any]] = Counter()
        self._task: asyncio.Task[None] | None = None

    def note(self, model: str, outcome: str, duration_s: float, ttft_s: float | None) -> None:
        pending = self.pending
        pending[model, "n", outcome] += 1
        if outcome != "ok":
            return  # a refusal's few milliseconds say nothing of how long answers take
        pending[model, "d", bucket(duration_s)] += 1
        if ttft_s is not None:
            pending[model, "t", bucket(ttft_s)] += 1

    def start(self) -> None:
        self._task = asyncio.create_task(self._flush_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self.flush()

    async def flush(self) -> None:
        if not self.pending:
            return
        counts, self.pending = self.pending, Counter()
        args: list[Any] = []
        for (model, kind, key), n in counts.items():
            args += [f"{model}|{kind}|{key}", n]
        try:
            await self.scripts.call("health_add", *args)
        except (RedisError, OSError):
            # Kept for the next flush: Redis is away for a moment.
            self.pending.update(counts)
            raise

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                await self.flush()
            except (RedisError, OSError) as exc:
                log.debug("provider_health_not_flushed", error=str(exc))


def summarise(fields: dict[str, int]) -> dict[str, Any]:
    """The per-model view of the summed minute counts (``<model>|n|<outcome>`` ...)."""
    models: dict[str, dict[str, Any]] = {}
    durations: dict[str, dict[int, int]] = {}
    ttfts: dict[str, dict[int, int]] = {}
    for field, n in fields.items():
        model, _, rest = field.partition("|")
        kind, _, key = rest.partition("|")
        if kind == "n":
            entry = models.setdefault(model, {"requests": dict.fromkeys(OUTCOMES, 0)})
            entry["requests"][key] = entry["requests"].get(key, 0) + n
        elif kind in ("d", "t") and key.isdigit():
            target = durations if kind == "d" else ttfts
            target.setdefault(model, {})[int(key)] = n
    out: dict[str, Any] = {}
    for model in sorted(models.keys() | durations.keys()):
        entry = models.get(model, {"requests": dict.fromkeys(OUTCOMES, 0)})
        d, t = durations.get(model, {}), ttfts.get(model, {})
        out[model] = {
            "window_s": WINDOW_MIN * 60,
            "requests": entry["requests"],
            "duration_p50_s": percentile(d, 0.5),
            "duration_p95_s": percentile(d, 0.95),
            "ttft_p50_s": percentile(t, 0.5),
            "ttft_p95_s": percentile(t, 0.95),
        }
    return out
