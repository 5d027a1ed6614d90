"""Adaptive caps: every provider call's outcome moves its model's cap (``lua/adapt.lua``
holds the rule; ``lua/claim.lua`` applies the cap, shared by every replica). And
outages: a model whose last ``OUTAGE_TRIES`` calls in this process all failed (5xx,
timeouts, unreachable) gets its circuit opened for every replica (``CIRCUIT_OPEN_S``),
so that its waiting tasks go to their next model at once and one probe tells when it
is back.

A process tallies its calls per model and sends the tallies every ``FLUSH_S``, in one
script call; a rate limit is sent at once, so that a cut reaches every replica's next
claim. Only runs let in after the cap's last change move it (the others were let in
under the old cap), as far as this process knows of that change; a 429 of any run
keeps the round from counting as clean.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from redis.exceptions import RedisError

from llmworker.settings import FAKE_PROVIDER, Settings

if TYPE_CHECKING:
    from llmworker.providers.client import CallReport
    from llmworker.queue import Queue

log = structlog.get_logger("llmworker.providers")

FLUSH_S = 0.25
OUTAGE_TRIES = 6


@dataclass
class _Tally:
    oks: int = 0
    limited: int = 0
    latest_limited_ms: float = 0.0
    ttft_ms: float = 0.0
    ttfts: int = 0


class Adapter:
    def __init__(self, settings: Settings, queue: Queue) -> None:
        self.settings = settings
        self.queue = queue
        self.enabled = settings.adaptive_caps
        # The models that have a provider to watch (not the in-process fake), and those
        # whose cap also follows their latency: known once, not looked up per call.
        self._watched = {a for a, m in settings.models.items() if m.provider != FAKE_PROVIDER}
        self._latency = {
            a for a, m in settings.models.items() if m.provider in settings.latency_providers
        }
        self._tallies: dict[str, _Tally] = {}
        # model -> when its cap last changed (ms), as the last reply said
        self._changed: dict[str, float] = {}
        # model -> failed tries in a row (server errors, timeouts, unreachable)
        self._failing: dict[str, int] = {}
        self._outages: set[str] = set()
        self._urgent = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None

    def note(self, call: CallReport) -> None:
        if call.alias not in self._watched:
            return
        self._note_outage(call)
        if not self.enabled:
            return
        tally = self._tallies.setdefault(call.alias, _Tally())
        if call.outcome == "ok":
            if call.started_ms < self._changed.get(call.alias, 0.0):
                return  # let in under the old cap: says nothing of the new one
            tally.oks += 1
            if call.ttft_s is not None:
                tally.ttft_ms += call.ttft_s * 1000
                tally.ttfts += 1
        elif call.error == "provider_rate_limited":
            tally.limited += 1
            tally.latest_limited_ms = max(tally.latest_limited_ms, call.started_ms)
            self._urgent.set()

    def _note_outage(self, call: CallReport) -> None:
        if call.outcome in ("server_error", "timeout"):
            failing = self._failing[call.alias] = self._failing.get(call.alias, 0) + 1
            if failing >= OUTAGE_TRIES:
                self._outages.add(call.alias)
                self._urgent.set()
        elif call.outcome in ("ok", "rate_limited"):
            self._failing.pop(call.alias, None)

    def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.create_task(self._forever(), name="llmworker-adapt")

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None

    async def _forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._urgent.wait(), FLUSH_S)
            self._urgent.clear()
            try:
                await self.flush()
            except (RedisError, OSError) as exc:
                # The tallies are dropped: what they said is stale by the next round.
                log.debug("adapt_not_recorded", error=str(exc))
            except Exception:
                log.exception("adapt_failed")

    async def flush(self) -> None:
        outages, self._outages = self._outages, set()
        for model in outages:
            try:
                opened = await self.queue.open_circuit(
                    model, int(self.settings.circuit_open_s * 1000), "provider_unavailable"
                )
            except (RedisError, OSError):
                self._outages |= outages  # tried again at the next flush
                raise
            if opened:
                log.warning(
                    "circuit_opened",
                    model=model,
                    code="provider_unavailable",
                    open_s=self.settings.circuit_open_s,
                    error=f"the last {OUTAGE_TRIES} calls failed",
                )
        tallies, self._tallies = self._tallies, {}
        rows = []
        for model, t in tallies.items():
            latency = model in self._latency
            ttft = round(t.ttft_ms / t.ttfts, 3) if t.ttfts and latency else -1
            rows.append(
                (
                    model,
                    str(self.settings.model_ceiling(model)),
                    str(self.settings.rates.floor(model)),
                    str(t.oks),
                    str(t.limited),
                    str(int(t.latest_limited_ms)),
                    str(ttft),
                    "1" if latency else "0",
                )
            )
        if not rows:
            return
        for change in await self.queue.adapt(" ".join(self.settings.tier_names), rows):
            self._changed[change.model] = float(change.changed_ms)
            if change.reason:
                log.info(
                    "adaptive_cap",
                    model=change.model,
                    before=change.before,
                    cap=change.cap if change.cap is not None else "max",
                    reason=change.reason,
                )
