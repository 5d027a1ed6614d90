"""Prometheus metrics (``GET /metrics``); the names are part of the contract (DESIGN.md).

Two kinds:

- **What this process did**: counters and histograms (tasks submitted, finished and
  rejected; queue and run time; provider calls, their outcome, duration, time to first
  token and tokens; callbacks). Each replica counts its own: sum them over replicas
  (``sum by (...)``). Under ``serve --workers N`` every process writes its counts to a
  file in ``METRICS_DIR`` each second, and whichever process a scrape
  reaches adds the others' files to its own counts.
- **What the deployment holds**: gauges read from Redis at scrape time in one round
  trip (waiting tasks, the oldest wait, running tasks, guard slots, replicas, the
  callback outbox). Every replica reports the same values: take ``max without
  (instance)``.

Counting is a dictionary update, about a third of a ``prometheus_client`` metric's
cost (which takes a lock, and in its multiprocess mode writes a memory-mapped file, per
observation): the metrics calls of a task take about 2.5 us (``make bench``, "the cost of
seeing"). ``prometheus_client`` writes the exposition. No label ever carries a user or a
task id.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from llmworker.observe.snapshot import Snapshot

if TYPE_CHECKING:
    from llmworker.providers import CallReport
    from llmworker.usage import Cost

log = structlog.get_logger("llmworker.observe")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# How often a process of `serve --workers N` writes its counts for the others.
SHARE_S = 1.0

# The OpenTelemetry GenAI semantic conventions' advisory buckets.
GENAI_DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
GENAI_TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
QUEUE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
RUN_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
TTFT_BUCKETS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 51.2)

GENAI_CALL = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")

# name -> (help, label names, histogram bucket bounds or None for a counter)
FAMILIES: dict[str, tuple[str, tuple[str, ...], tuple[float, ...] | None]] = {
    "llmworker_tasks_submitted": (
        "Tasks admitted, by where they came from (api, qstash, handler).",
        ("tier", "model", "source"),
        None,
    ),
    "llmworker_tasks_finished": (
        "Tasks that reached a final state, counted by the replica that saw it happen.",
        ("tier", "model", "status"),
        None,
    ),
    "llmworker_tasks_rejected": (
        "Submissions refused, by error code (queue_full, invalid_field, unauthorized ...).",
        ("reason",),
        None,
    ),
    "llmworker_task_queue_seconds": (
        "Time from admission to the start of the first run.",
        ("tier", "model"),
        QUEUE_BUCKETS,
    ),
    "llmworker_task_run_seconds": (
        "Time a run took, by how it ended.",
        ("tier", "model", "status"),
        RUN_BUCKETS,
    ),
    "llmworker_provider_ttft_seconds": (
        "Time from a provider call to its first streamed token.",
        ("model",),
        TTFT_BUCKETS,
    ),
    "llmworker_provider_requests": (
        "Provider calls by outcome (ok, rate_limited, server_error, timeout, client_error).",
        ("model", "outcome"),
        None,
    ),
    "llmworker_fallbacks": (
        "Tasks moved to another of their models before their first token, by why "
        "(rate_limited, circuit_open, unavailable, context, spill).",
        ("from", "to", "reason"),
        None,
    ),
    "llmworker_cost_usd": (
        "What finished runs cost, in USD (models without a price count nothing here).",
        ("model", "tier"),
        None,
    ),
    "llmworker_tokens": (
        "Tokens finished runs used, by type (input, cached_input, output, reasoning).",
        ("model", "tier", "type"),
        None,
    ),
    "llmworker_callbacks": (
        "Callback delivery attempts by outcome (delivered, retry, failed).",
        ("outcome",),
        None,
    ),
    "gen_ai_client_operation_duration_seconds": (
        "GenAI operation duration (OpenTelemetry gen_ai.client.operation.duration).",
        (*GENAI_CALL, "error_type"),
        GENAI_DURATION_BUCKETS,
    ),
    "gen_ai_client_token_usage": (
        "Tokens used per GenAI operation (OpenTelemetry gen_ai.client.token.usage).",
        (*GENAI_CALL, "gen_ai_token_type"),
        GENAI_TOKEN_BUCKETS,
    ),
}

# A counter's values: labels -> count. A histogram's: labels -> [count per bucket ...,
# count past the last bound, sum].
Values = dict[tuple[str, ...], Any]


def _observe(values: Values, bounds: tuple[float, ...], key: tuple[str, ...], x: float) -> None:
    row = values.get(key)
    if row is None:
        row = values[key] = [0] * (len(bounds) + 1) + [0.0]
    row[bisect_left(bounds, x)] += 1
    row[-1] += x


class Metrics:
    """What the pipeline reports as it goes, kept in plain dictionaries."""

    def __init__(self) -> None:
        self.values: dict[str, Values] = {name: {} for name in FAMILIES}
        v = self.values
        self._submitted = v["llmworker_tasks_submitted"]
        self._finished = v["llmworker_tasks_finished"]
        self._rejected = v["llmworker_tasks_rejected"]
        self._queue_s = v["llmworker_task_queue_seconds"]
        self._run_s = v["llmworker_task_run_seconds"]
        self._ttft = v["llmworker_provider_ttft_seconds"]
        self._provider = v["llmworker_provider_requests"]
        self._callbacks = v["llmworker_callbacks"]
        self._fallbacks = v["llmworker_fallbacks"]
        self._cost = v["llmworker_cost_usd"]
        self._used = v["llmworker_tokens"]
        self._duration = v["gen_ai_client_operation_duration_seconds"]
        self._tokens = v["gen_ai_client_token_usage"]
        self._shared: Path | None = None
        self._write_failed = False
        self._sharing: asyncio.Task[None] | None = None

    def submitted(self, tier: str, model: str, source: str) -> None:
        key = (tier, model, source)
        self._submitted[key] = self._submitted.get(key, 0) + 1

    def rejected(self, reason: str) -> None:
        key = (reason,)
        self._rejected[key] = self._rejected.get(key, 0) + 1

    def started(self, tier: str, model: str, queue_s: float) -> None:
        _observe(self._queue_s, QUEUE_BUCKETS, (tier, model), queue_s)

    def finished(self, tier: str, model: str, status: str, run_s: float | None = None) -> None:
        key = (tier, model, status)
        self._finished[key] = self._finished.get(key, 0) + 1
        if run_s is not None:
            _observe(self._run_s, RUN_BUCKETS, key, run_s)

    def provider_call(self, call: CallReport) -> None:
        key = (call.alias, call.outcome)
        self._provider[key] = self._provider.get(key, 0) + 1
        if call.ttft_s is not None:
            _observe(self._ttft, TTFT_BUCKETS, (call.alias,), call.ttft_s)
        labels = ("chat", call.provider, call.model)
        _observe(self._duration, GENAI_DURATION_BUCKETS, (*labels, call.error), call.duration_s)
        if call.usage:
            for kind, name in (("input", "prompt_tokens"), ("output", "completion_tokens")):
                n = call.usage.get(name)
                if isinstance(n, int) and not isinstance(n, bool):
                    _observe(self._tokens, GENAI_TOKEN_BUCKETS, (*labels, kind), n)

    def callback(self, outcome: str) -> None:
        key = (outcome,)
        self._callbacks[key] = self._callbacks.get(key, 0) + 1

    def fallback(self, source: str, target: str, reason: str) -> None:
        key = (source, target, reason)
        self._fallbacks[key] = self._fallbacks.get(key, 0) + 1

    def spent(self, tier: str, model: str, cost: Cost) -> None:
        """A run's tokens and cost, as booked."""
        if cost.usd:
            self._cost[(model, tier)] = self._cost.get((model, tier), 0.0) + cost.usd
        for kind, n in asdict(cost.tokens).items():
            if n:
                key = (model, tier, kind)
                self._used[key] = self._used.get(key, 0) + n

    # -- serve --workers N: each process's counts in a file the others read -------------

    def share(self, folder: Path | None) -> None:
        """Start writing this process's counts to ``folder`` (``METRICS_DIR``), if any."""
        if folder is None or self._sharing is not None:
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("metrics_not_shared", folder=str(folder), error=str(exc))
            return
        self._shared = folder / f"llmworker-{os.getpid()}.json"
        self._sharing = asyncio.create_task(self._share_forever())

    async def unshare(self) -> None:
        if self._sharing is not None:
            self._sharing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sharing
            self._sharing = None
            self._write()

    async def _share_forever(self) -> None:
        while True:
            self._write()
            await asyncio.sleep(SHARE_S)

    def _write(self) -> bool:
        """Write this process's counts for the others; False if the file cannot be."""
        if self._shared is None:
            return False
        data = {name: [[*k, v] for k, v in values.items()] for name, values in self.values.items()}
        tmp = self._shared.with_suffix(".tmp")
        try:
            tmp.write_bytes(orjson.dumps(data))
            tmp.replace(self._shared)
        except OSError as exc:
            if not self._write_failed:
                log.warning("metrics_not_shared", file=str(self._shared), error=str(exc))
            self._write_failed = True
            return False
        self._write_failed = False
        return True

    def _merged(self) -> dict[str, Values]:
        """This process's counts; with ``--workers N``, the sum of every process's file,
        this process's written first. Every process answers from the same files, so a
        count never goes back from one scrape to the next, whichever process answers
        (Prometheus would read that as a restart)."""
        if self._shared is None:
            return self.values
        written = self._write()
        merged: dict[str, Values] = {name: {} for name in FAMILIES}
        if not written:  # the others cannot see this process's counts: add them here
            for name, values in self.values.items():
                for key, value in values.items():
                    _add(merged[name], key, value)
        for path in self._shared.parent.glob("llmworker-*.json"):
            if path == self._shared and not written:
                continue
            try:
                data = orjson.loads(path.read_bytes())
            except (OSError, orjson.JSONDecodeError):
                continue
            for name, rows in data.items():
                target = merged.get(name)
                if target is None:
                    continue
                width = len(FAMILIES[name][1])
                for row in rows:
                    key, value = tuple(row[:width]), row[width]
                    _add(target, key, value)
        return merged

    # -- the scrape -----------------------------------------------------------------------

    def exposition(self, snap: Snapshot | None) -> bytes:
        """This process's (with ``--workers N``, every process's) metrics, then the
        deployment's gauges (left out when Redis could not be read)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Counts(self._merged()))
        if snap is not None:
            registry.register(_Deployment(snap))
        return generate_latest(registry)


def _add(target: Values, key: tuple[str, ...], value: Any) -> None:
    mine = target.get(key)
    if mine is None:
        target[key] = list(value) if isinstance(value, list) else value
    elif isinstance(mine, list):
        for i, n in enumerate(value):
            mine[i] += n
    else:
        target[key] = mine + value


class NoMetrics(Metrics):
    """``METRICS_ENABLED=false``: nothing is counted."""

    def submitted(self, tier: str, model: str, source: str) -> None:
        pass

    def rejected(self, reason: str) -> None:
        pass

    def started(self, tier: str, model: str, queue_s: float) -> None:
        pass

    def finished(self, tier: str, model: str, status: str, run_s: float | None = None) -> None:
        pass

    def provider_call(self, call: CallReport) -> None:
        pass

    def callback(self, outcome: str) -> None:
        pass

    def fallback(self, source: str, target: str, reason: str) -> None:
        pass

    def spent(self, tier: str, model: str, cost: Cost) -> None:
        pass


class _Counts(Collector):
    def __init__(self, values: dict[str, Values]) -> None:
        self.values = values

    def collect(self) -> Iterator[Metric]:
        for name, (doc, labels, bounds) in FAMILIES.items():
            values = self.values[name]
            if bounds is None:
                counter = CounterMetricFamily(name, doc, labels=labels)
                for key, n in sorted(values.items()):
                    counter.add_metric(list(key), n)
                yield counter
                continue
            histogram = HistogramMetricFamily(name, doc, labels=labels)
            for key, row in sorted(values.items()):
                cumulative, buckets = 0, []
                for bound, n in zip(bounds, row, strict=False):
                    cumulative += n
                    buckets.append((_le(bound), cumulative))
                buckets.append(("+Inf", cumulative + row[len(bounds)]))
                histogram.add_metric(list(key), buckets, sum_value=row[-1])
            yield histogram


def _le(bound: float) -> str:
    return repr(float(bound))


class _Deployment(Collector):
    """The snapshot's gauges, for one scrape."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        snap = self.snap
        waiting = GaugeMetricFamily(
            "llmworker_queue_waiting",
            "Tasks waiting, per tier and model.",
            labels=["tier", "model"],
        )
        oldest = GaugeMetricFamily(
            "llmworker_queue_oldest_age_seconds",
            "Age of the oldest waiting task, per tier and model (0 when none waits).",
            labels=["tier", "model"],
        )
        running = GaugeMetricFamily(
            "llmworker_tasks_running",
            "Tasks running, per tier and model.",
            labels=["tier", "model"],
        )
        for lane in snap.lanes:
            labels = [lane.tier, lane.model]
            waiting.add_metric(labels, lane.waiting)
            oldest.add_metric(labels, lane.oldest_wait_s or 0.0)
            running.add_metric(labels, lane.running)
        used = GaugeMetricFamily(
            "llmworker_guard_slots_used", "Slots held (live leases) per guard.", labels=["guard"]
        )
        limit = GaugeMetricFamily(
            "llmworker_guard_slots_limit", "Slots per guard (MAX_* settings).", labels=["guard"]
        )
        for name, (n, cap) in snap.guards.items():
            used.add_metric([name], n)
            limit.add_metric([name], cap)
        yield from (waiting, oldest, running, used, limit)
        held = GaugeMetricFamily(
            "llmworker_model_held_seconds",
            "Seconds until a model takes tasks again after its provider asked to wait.",
            labels=["model"],
        )
        for model in snap.models:
            held.add_metric([model], snap.held.get(model, 0.0))
        yield held
        caps = GaugeMetricFamily(
            "llmworker_adaptive_cap",
            "Calls a model may have in flight per tier, as its adaptive cap leaves the "
            "MAX_* limit (equal to it when the provider gave no sign of overload).",
            labels=["model", "tier"],
        )
        for lane in snap.lanes:
            caps.add_metric([lane.model, lane.tier], lane.cap)
        yield caps
        circuits = GaugeMetricFamily(
            "llmworker_circuit_open",
            "1 while a model's circuit is open or half-open (a refused key or an "
            "exhausted quota): its tasks wait or go to their next model.",
            labels=["model"],
        )
        for model in snap.models:
            circuits.add_metric([model], 1 if model in snap.circuits else 0)
        yield circuits
        yield GaugeMetricFamily(
            "llmworker_replicas",
            "Replicas alive (heartbeat within its lease).",
            value=snap.replicas,
        )
        yield GaugeMetricFamily(
            "llmworker_callbacks_pending",
            "Callbacks in the outbox: due, being attempted or waiting for a retry.",
            value=snap.callbacks,
        )
