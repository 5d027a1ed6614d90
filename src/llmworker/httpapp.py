"""The HTTP plumbing under the routes: JSON answers, the one place errors become
answers, request bodies, and the ASGI app with its access log and its fast path."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from llmworker.errors import BodyTooLarge, ClientGone, NotJSON, RequestError

log = structlog.get_logger("llmworker.api")
access = structlog.get_logger("llmworker.access")

# Probes, scrapers and the dashboard call these every few seconds: their access lines are
# DEBUG, the rest INFO.
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics", "/v1/stats", "/v1/failures"})
TASK_PATH_RE = re.compile(r"^/v1/tasks/([^/]+)")
# QStash moves a delivery answered with this status and header to its dead-letter queue
# instead of retrying it: for tasks that can never be admitted.
NON_RETRYABLE_STATUS = 489


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_body(exc: RequestError) -> dict[str, Any]:
    return {"error": exc.code, "message": exc.message, **exc.extra()}


def error_answer(exc: RequestError) -> JSON:
    headers = {}
    if exc.status == 429:
        headers["Retry-After"] = str(exc.extra().get("retry_after", 1))
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, ClientGone):
        log.debug("client_disconnected", message=exc.message)
    return JSON(error_body(exc), status_code=exc.status, headers=headers)


def non_retryable_answer(exc: RequestError) -> JSON:
    return JSON(
        error_body(exc),
        status_code=NON_RETRYABLE_STATUS,
        headers={"Upstash-NonRetryable-Error": "true"},
    )


def redis_answer(request: Request, exc: Exception) -> JSON:
    log.error("redis_unavailable", error=str(exc), path=request.url.path)
    return JSON(
        {"error": "unavailable", "message": "The queue's Redis is unreachable; retry shortly."},
        status_code=503,
        headers={"Retry-After": "2"},
    )


def require_json(request: Request, what: str = "the task as JSON") -> None:
    """Submissions must say they are JSON: a browser's cross-site "simple request"
    (text/plain, form encodings) can then never submit a task."""
    declared = request.headers.get("content-type", "")
    if declared.split(";", 1)[0].strip().lower() != "application/json":
        shown = declared[:60] or "none"
        raise NotJSON(f"Send {what} with 'Content-Type: application/json' (got {shown}).")


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"The body is {declared} bytes; the limit is {limit} (MAX_BODY_BYTES).")
    chunks = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"The body is over the limit of {limit} bytes (MAX_BODY_BYTES).")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone(f"The client went away after sending {size} bytes.") from None
    return b"".join(chunks)


async def request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return error_answer(exc)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSON(
        {"error": code, "message": f"{request.method} {request.url.path}: {exc.detail}."},
        exc.status_code,
        headers=exc.headers,
    )


async def redis_error(request: Request, exc: Exception) -> Response:
    return redis_answer(request, exc)


Handler = Callable[[Request], Awaitable[Response]]


class App(Starlette):
    """Starlette, with two additions:

    - one access line per request (method, path, status, milliseconds, and the task id
      where there is one), when ``access_log`` is on;
    - ``POST /v1/tasks``, the busiest route, goes straight to its handler (``fast``),
      past the router and the middleware stack (about a quarter of the CPU of a
      submission). Its errors become the same answers the exception handlers give.
    """

    fast: Handler | None = None
    access_log: bool = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        if not self.access_log:
            await self._serve(scope, receive, send)
            return
        started = time.perf_counter()
        answer: list[Message] = []

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer.append(message)
            await send(message)

        failed = False
        try:
            await self._serve(scope, receive, sending)
        except BaseException:
            failed = True  # uvicorn answers 500, if it still can
            raise
        finally:
            _access_line(scope, answer[0] if answer else None, started, failed)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fast is not None and scope["method"] == "POST" and scope["path"] == "/v1/tasks":
            request = Request(scope, receive)
            try:
                response = await self.fast(request)
            except RequestError as exc:
                response = error_answer(exc)
            except RedisError as exc:
                response = redis_answer(request, exc)
            await response(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _access_line(scope: Scope, start: Message | None, started: float, failed: bool) -> None:
    path: str = scope["path"]
    status = start["status"] if start else (500 if failed else 0)
    task_id = None
    if match := TASK_PATH_RE.match(path):
        task_id = match.group(1)
    elif start is not None and status in (200, 202):
        # A submission: the new (or found) task is where its Location points.
        for name, value in start.get("headers", ()):
            if name.lower() == b"location":
                task_id = value.decode("latin-1").rpartition("/")[2]
                break
    fields: dict[str, Any] = {
        "method": scope["method"],
        "path": path,
        "status": status,
        "ms": round((time.perf_counter() - started) * 1000, 1),
    }
    if task_id is not None:
        fields["task_id"] = task_id
    if path in QUIET_PATHS:
        access.debug("request", **fields)
    else:
        access.info("request", **fields)
