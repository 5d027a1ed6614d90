"""Logging: structlog over the standard library, one event per line.

Ids bound with ``structlog.contextvars`` (a task's id and kind in the executor) are
carried into every line logged while they are bound. ``LOG_FORMAT=json`` makes every
line JSON: llmworker's own, and those of uvicorn, asyncio and every other library that
logs through the standard library (formatted by structlog's ``ProcessorFormatter``),
warnings and uncaught exceptions included. ``console`` is for people.
"""

from __future__ import annotations

import logging
import sys
from types import TracebackType

import structlog

from llmworker.settings import Settings


def configure_logging(settings: Settings) -> None:
    level = getattr(logging, settings.log_level.upper())
    json = settings.log_format == "json"
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    renderer: structlog.types.Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    # Tracebacks become one field of the event: in JSON, one line still.
    finish: list[structlog.types.Processor] = [structlog.processors.format_exc_info] if json else []
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            *finish,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *finish,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))
    if json:
        sys.excepthook = _log_uncaught


def _log_uncaught(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    structlog.get_logger("llmworker").critical("uncaught_exception", exc_info=(kind, value, tb))
