"""Traces, when asked for (``OTEL_EXPORTER_OTLP_ENDPOINT``): one trace per task.

The submission's span (``llmworker.submit``) continues the ``traceparent`` of the request
that sent the task; its context is stored with the task (field ``trace``), so whichever
replica runs the task continues the same trace: ``llmworker.wait`` (admission to the
start of a run), ``llmworker.run`` for each run, a ``chat <model>`` span for each provider
call (OpenTelemetry's GenAI semantic conventions) and ``llmworker.callback`` for each
delivery, whose request carries the ``traceparent`` on to the app. Follow-up tasks
submitted by a handler join their parent's trace.

Off unless the endpoint is set; the OpenTelemetry packages (``llmworker[otel]``) are
then never imported, and every function here returns at once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

    from llmworker.providers import CallReport

log = structlog.get_logger("llmworker.observe")

_tracer: Tracer | None = None
_provider: Any = None


def active() -> bool:
    return _tracer is not None


def setup(endpoint: str | None, exporter: SpanExporter | None = None) -> None:
    """Start tracing: to the OTLP/HTTP ``endpoint`` (the exporter reads the standard
    ``OTEL_EXPORTER_OTLP_*`` variables), or to ``exporter`` (tests)."""
    global _tracer, _provider
    if endpoint is None and exporter is None:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from llmworker import __version__

    provider = TracerProvider(
        resource=Resource.create({"service.name": "llmworker", "service.version": __version__})
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _provider = provider
    _tracer = provider.get_tracer("llmworker", __version__)
    log.info("tracing", endpoint=endpoint or "in-process exporter")


def shutdown() -> None:
    """Stop tracing, sending what is buffered."""
    global _tracer, _provider
    if _provider is not None:
        with contextlib.suppress(Exception):
            _provider.shutdown()
    _tracer = _provider = None


def _context(traceparent: str | None) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if not traceparent:
        return None
    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def _traceparent() -> str | None:
    """The current span's context as a W3C ``traceparent``."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent")


def current() -> str | None:
    """What a task admitted now stores as its ``trace``: the current span's context."""
    return _traceparent() if _tracer is not None else None


@contextlib.contextmanager
def submit_span(headers: Mapping[str, str], source: str) -> Iterator[None]:
    """Around an HTTP submission, continuing the request's ``traceparent``."""
    if _tracer is None:
        yield
        return
    parent = _context(headers.get("traceparent"))
    # A span records the exception that ends it and its error status by itself.
    with _tracer.start_as_current_span(
        "llmworker.submit", context=parent, attributes={"llmworker.source": source}
    ):
        yield


def _ns(ms: str | None) -> int | None:
    return int(ms) * 1_000_000 if ms else None


@contextlib.contextmanager
def run_span(fields: Mapping[str, str]) -> Iterator[None]:
    """Around one run of a task: the wait before it, then the run as the current span
    (its provider calls and follow-up tasks are its children)."""
    if _tracer is None:
        yield
        return
    parent = _context(fields.get("trace"))
    attributes: dict[str, Any] = {
        "llmworker.task.id": fields.get("id", ""),
        "llmworker.task.kind": fields.get("kind", ""),
        "llmworker.tier": fields.get("tier", ""),
        "llmworker.model": fields.get("model", ""),
        "llmworker.attempt": int(fields.get("attempts") or 0),
    }
    started = _ns(fields.get("started_at"))
    created = _ns(fields.get("created_at"))
    if created and started and int(fields.get("attempts") or 0) <= 1:
        wait = _tracer.start_span(
            "llmworker.wait", context=parent, start_time=created, attributes=attributes
        )
        wait.end(end_time=max(created, started))
    with _tracer.start_as_current_span(
        "llmworker.run", context=parent, start_time=started, attributes=attributes
    ):
        yield


def provider_call(call: CallReport) -> None:
    """A provider call that just ended, as a child of the current run."""
    if _tracer is None:
        return
    from opentelemetry.trace import SpanKind

    end = time.time_ns()
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": call.provider,
        "gen_ai.request.model": call.model,
        "llmworker.model": call.alias,
    }
    usage = call.usage or {}
    for attr, key in (
        ("gen_ai.usage.input_tokens", "prompt_tokens"),
        ("gen_ai.usage.output_tokens", "completion_tokens"),
    ):
        if isinstance(usage.get(key), int):
            attributes[attr] = usage[key]
    if call.ttft_s is not None:
        attributes["llmworker.ttft_s"] = round(call.ttft_s, 4)
    if call.error:
        attributes["error.type"] = call.error
    span = _tracer.start_span(
        f"chat {call.model}",
        kind=SpanKind.CLIENT,
        start_time=end - int(call.duration_s * 1e9),
        attributes=attributes,
    )
    if call.error:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, call.error))
    span.end(end_time=end)


@contextlib.contextmanager
def callback_span(fields: Mapping[str, str], headers: dict[str, str]) -> Iterator[None]:
    """Around one callback delivery; adds its ``traceparent`` to ``headers``."""
    if _tracer is None:
        yield
        return
    from opentelemetry.trace import SpanKind

    attributes: dict[str, Any] = {
        "llmworker.task.id": fields.get("id", ""),
        "llmworker.callback.attempt": int(fields.get("cb_attempts") or 1),
    }
    with _tracer.start_as_current_span(
        "llmworker.callback",
        context=_context(fields.get("trace")),
        kind=SpanKind.CLIENT,
        attributes=attributes,
    ):
        if parent := _traceparent():
            headers["traceparent"] = parent
        yield
