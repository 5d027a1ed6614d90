"""Prometheus metrics (``GET /metrics``); the names are part of the contract (DESIGN.md).

Two kinds:

- **What this process did**: counters and histograms (tasks submitted, finished and
  rejected; queue and run time; provider calls, their outcome, duration, time to first
  token and tokens; callbacks). Each replica counts its own: sum them over replicas
  (``sum by (...)``). Under ``serve --workers N`` the processes share a folder
  (``PROMETHEUS_MULTIPROC_DIR``, set by ``serve``) and any of them answers for all.
- **What the deployment holds**: gauges read from Redis at scrape time in one round
  trip (waiting tasks, the oldest wait, running tasks, guard slots, replicas, the
  callback outbox). Every replica reports the same values: take ``max without
  (instance)``.

No label ever carries a user or a task id: series stay as many as tiers times models.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from llmworker.observe.snapshot import Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

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

# No `_created` series: a scrape stays half the size, and nothing here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# The process's own metrics live here; in multiprocess mode their values are written to
# files instead, and read back by MultiProcessCollector.
REGISTRY = CollectorRegistry(auto_describe=False)


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


_submitted = Counter(
    "llmworker_tasks_submitted",
    "Tasks admitted, by where they came from (api, qstash, handler).",
    ["tier", "model", "source"],
    registry=REGISTRY,
)
_finished = Counter(
    "llmworker_tasks_finished",
    "Tasks that reached a final state, counted by the replica that saw it happen.",
    ["tier", "model", "status"],
    registry=REGISTRY,
)
_rejected = Counter(
    "llmworker_tasks_rejected",
    "Submissions refused, by error code (queue_full, invalid_field, unauthorized ...).",
    ["reason"],
    registry=REGISTRY,
)
_queue_s = Histogram(
    "llmworker_task_queue_seconds",
    "Time from admission to the start of a run.",
    ["tier", "model"],
    buckets=QUEUE_BUCKETS,
    registry=REGISTRY,
)
_run_s = Histogram(
    "llmworker_task_run_seconds",
    "Time a run took, by how it ended.",
    ["tier", "model", "status"],
    buckets=RUN_BUCKETS,
    registry=REGISTRY,
)
_ttft = Histogram(
    "llmworker_provider_ttft_seconds",
    "Time from a provider call to its first streamed token.",
    ["model"],
    buckets=TTFT_BUCKETS,
    registry=REGISTRY,
)
_provider = Counter(
    "llmworker_provider_requests",
    "Provider calls by outcome (ok, rate_limited, server_error, timeout, client_error).",
    ["model", "outcome"],
    registry=REGISTRY,
)
_callbacks = Counter(
    "llmworker_callbacks",
    "Callback delivery attempts by outcome (delivered, retry, failed).",
    ["outcome"],
    registry=REGISTRY,
)
_genai_duration = Histogram(
    "gen_ai_client_operation_duration_seconds",
    "GenAI operation duration (OpenTelemetry gen_ai.client.operation.duration).",
    ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "error_type"],
    buckets=GENAI_DURATION_BUCKETS,
    registry=REGISTRY,
)
_genai_tokens = Histogram(
    "gen_ai_client_token_usage",
    "Tokens used per GenAI operation (OpenTelemetry gen_ai.client.token.usage).",
    ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_token_type"],
    buckets=GENAI_TOKEN_BUCKETS,
    registry=REGISTRY,
)


class Metrics:
    """What the pipeline reports as it goes. The labelled children are looked up once
    per label set: the hot paths pay one dictionary lookup and one increment."""

    def __init__(self) -> None:
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def submitted(self, tier: str, model: str, source: str) -> None:
        self._child(_submitted, tier, model, source).inc()

    def rejected(self, reason: str) -> None:
        self._child(_rejected, reason).inc()

    def started(self, tier: str, model: str, queue_s: float) -> None:
        self._child(_queue_s, tier, model).observe(queue_s)

    def finished(self, tier: str, model: str, status: str, run_s: float | None = None) -> None:
        self._child(_finished, tier, model, status).inc()
        if run_s is not None:
            self._child(_run_s, tier, model, status).observe(run_s)

    def provider_call(
        self,
        model: str,
        provider: str,
        provider_model: str,
        outcome: str,
        duration_s: float,
        ttft_s: float | None,
        error_type: str,
        usage: dict[str, Any] | None,
    ) -> None:
        self._child(_provider, model, outcome).inc()
        if ttft_s is not None:
            self._child(_ttft, model).observe(ttft_s)
        self._child(_genai_duration, "chat", provider, provider_model, error_type).observe(
            duration_s
        )
        if usage:
            for kind, name in (("input", "prompt_tokens"), ("output", "completion_tokens")):
                n = usage.get(name)
                if isinstance(n, int) and not isinstance(n, bool):
                    self._child(_genai_tokens, "chat", provider, provider_model, kind).observe(n)

    def callback(self, outcome: str) -> None:
        self._child(_callbacks, outcome).inc()


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

    def provider_call(self, *args: Any, **kwargs: Any) -> None:
        pass

    def callback(self, outcome: str) -> None:
        pass


class _Deployment(Collector):
    """The snapshot's gauges, for one scrape."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Any:
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


def exposition(snap: Snapshot | None) -> bytes:
    """The scrape: this process's (or, with ``--workers N``, every process's) metrics,
    then the deployment's gauges (None when Redis could not be read)."""
    if multiprocess():
        own = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(own)  # type: ignore[no-untyped-call]
        text = generate_latest(own)
    else:
        text = generate_latest(REGISTRY)
    if snap is None:
        return text
    deployment = CollectorRegistry(auto_describe=False)
    deployment.register(_Deployment(snap))
    return text + generate_latest(deployment)
