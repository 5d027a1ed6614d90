"""The HTTP edge: routes, authentication, and the one place errors become answers."""

from __future__ import annotations

import asyncio
import gc
import hmac
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import structlog
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from llmworker import signature
from llmworker.errors import (
    BadRequest,
    BodyTooLarge,
    InvalidField,
    NotConfigured,
    NotFound,
    RequestError,
    SignatureInvalid,
    Unauthorized,
)
from llmworker.record import FINAL_STATES, TaskSpec, record_view
from llmworker.settings import Settings, load_settings
from llmworker.worker import Worker

log = structlog.get_logger("llmworker.api")

SSE_PING_S = 15.0
EVENT_ID_RE = re.compile(r"^\d{1,20}(-\d{1,20})?$")


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_answer(exc: RequestError) -> JSON:
    headers = {}
    if exc.status == 429:
        headers["Retry-After"] = str(exc.extra().get("retry_after", 1))
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSON(_error_body(exc), status_code=exc.status, headers=headers)


def _error_body(exc: RequestError) -> dict[str, Any]:
    return {"error": exc.code, "message": exc.message, **exc.extra()}


# QStash moves a delivery answered with this status and header to its dead-letter queue
# instead of retrying it: for tasks that can never be admitted.
NON_RETRYABLE_STATUS = 489


def non_retryable_answer(exc: RequestError) -> JSON:
    return JSON(
        _error_body(exc),
        status_code=NON_RETRYABLE_STATUS,
        headers={"Upstash-NonRetryable-Error": "true"},
    )


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"The body is {declared} bytes; the limit is {limit} (MAX_BODY_BYTES).")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"The body is over the limit of {limit} bytes (MAX_BODY_BYTES).")
        chunks.append(chunk)
    return b"".join(chunks)


class Api:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.settings = worker.settings
        self._keys = [k.encode() for k in self.settings.api_key_list]

    def authorize(self, request: Request) -> None:
        if not self._keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode()
        # Compare with every key in constant time, so timing reveals nothing.
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(given, key)
        if scheme.lower() != "bearer" or not ok:
            raise Unauthorized("A valid API key is required: send 'Authorization: Bearer <key>'.")

    async def submit(self, request: Request) -> Response:
        self.authorize(request)
        body = await read_body(request, self.settings.max_body_bytes)
        spec = TaskSpec.parse(body)
        return await self._admitted(*await self.worker.admitter.submit(spec))

    async def _admitted(self, task_id: str, stored: dict[str, str] | None) -> Response:
        """202 with a new task's record; 200 with the existing one for a repeat."""
        headers = {"Location": f"/v1/tasks/{task_id}"}
        if stored is not None:
            return JSON(record_view(stored), status_code=202, headers=headers)
        headers["Idempotent-Replayed"] = "true"
        return JSON(record_view(await self._record(task_id)), status_code=200, headers=headers)

    async def qstash(self, request: Request) -> Response:
        """A QStash delivery: verified on the raw bytes, then admitted like a submission.
        2xx frees QStash's slot at once; 429 is retried after Retry-After; 489 sends a task
        that can never be admitted to the dead-letter queue; 5xx only for real faults."""
        keys = self.settings.qstash_keys
        if not keys and not self.settings.qstash_skip_verify:
            raise NotConfigured(
                "QStash deliveries are not accepted: set QSTASH_CURRENT_SIGNING_KEY and "
                "QSTASH_NEXT_SIGNING_KEY (Upstash console, QStash, Signing Keys)."
            )
        message_id = request.headers.get("upstash-message-id")
        try:
            body = await read_body(request, self.settings.max_body_bytes)
        except BodyTooLarge as exc:
            return non_retryable_answer(exc)
        if not self.settings.qstash_skip_verify:
            await self._verify(request, body, keys, message_id)
        retried = request.headers.get("upstash-retried", "")
        delivery = {
            "qstash_message_id": message_id or "",
            "qstash_retried": retried if retried.isdigit() else "0",
        }
        try:
            # The message id is the idempotency key unless the body names one; it is
            # validated like a body field (it ends up in a key name).
            spec = TaskSpec.parse(body, idempotency_key=message_id)
            admitted = await self.worker.admitter.submit(spec, delivery)
        except (BadRequest, InvalidField) as exc:
            log.warning("qstash_invalid_task", error=exc.code, message_id=message_id)
            return non_retryable_answer(exc)
        return await self._admitted(*admitted)

    async def _verify(
        self, request: Request, body: bytes, keys: list[str], message_id: str | None
    ) -> None:
        leeway = self.settings.qstash_clock_leeway_s
        try:
            claims = signature.verify(
                request.headers.get("upstash-signature"),
                body,
                self._signed_url(request),
                keys,
                leeway_s=leeway,
            )
            # QStash signs every attempt anew: a signature seen before is a replay (the
            # message id beside it is not signed, so it could not stop a replay).
            jti = str(claims.get("jti") or "")
            if jti:
                ttl_ms = int((float(claims["exp"]) + leeway - time.time()) * 1000)
                if not await self.worker.queue.first_use(
                    self.worker.keys.signature_seen(jti), ttl_ms
                ):
                    raise SignatureInvalid("replayed", "This signature was used before.")
        except SignatureInvalid as exc:
            log.warning("qstash_refused", check=exc.code, reason=exc.message, message_id=message_id)
            raise

    def _signed_url(self, request: Request) -> str:
        """The URL QStash signed for: PUBLIC_URL and this request's path (behind a proxy
        the request's own URL differs), or the request's own URL without PUBLIC_URL."""
        if not self.settings.public_url:
            return str(request.url)
        query = request.url.query
        return (
            self.settings.public_url.rstrip("/") + request.url.path + (f"?{query}" if query else "")
        )

    async def _record(self, task_id: str) -> dict[str, str]:
        fields = await self.worker.queue.get(task_id)
        if fields is None:
            raise NotFound(
                f"No task {task_id!r}: it never existed or its record expired (RESULT_TTL_S)."
            )
        return fields

    async def get(self, request: Request) -> Response:
        self.authorize(request)
        return JSON(record_view(await self._record(request.path_params["id"])))

    async def find(self, request: Request) -> Response:
        """``GET /v1/tasks?idempotency_key=K``: the task admitted with that key (for a task
        published through QStash, its message id)."""
        self.authorize(request)
        key = request.query_params.get("idempotency_key")
        if not key:
            raise BadRequest("Name the task: GET /v1/tasks/{id}, or ?idempotency_key=...")
        task_id = await self.worker.queue.find(key)
        if task_id is None:
            raise NotFound(f"No task with the idempotency key {key!r} (or its record expired).")
        return JSON(record_view(await self._record(task_id)))

    async def cancel(self, request: Request) -> Response:
        self.authorize(request)
        task_id = request.path_params["id"]
        before = await self.worker.queue.cancel(task_id, self.settings.result_ttl_s)
        if before is None:
            raise NotFound(f"No task {task_id!r}: it never existed or its record expired.")
        self.worker.notifier.wake()
        return JSON(record_view(await self._record(task_id)))

    async def events(self, request: Request) -> Response:
        self.authorize(request)
        task_id = request.path_params["id"]
        await self._record(task_id)
        last_id = request.headers.get("last-event-id") or request.query_params.get("after") or "0-0"
        if not EVENT_ID_RE.match(last_id):
            raise BadRequest(
                f"Last-Event-ID {last_id[:60]!r} is not an event id such as 1764352630545-0."
            )
        return StreamingResponse(
            self._stream(task_id, last_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _stream(self, task_id: str, last_id: str) -> AsyncIterator[bytes]:
        redis = self.worker.redis
        key = self.worker.keys.events(task_id)
        block_ms = int(SSE_PING_S * 1000)
        fields = await self.worker.queue.get(task_id)
        while True:
            final = fields is None or fields.get("status") in FINAL_STATES
            # A finished task has nothing more to wait for: read what is left and end,
            # even when the reader resumes after the last event.
            reply = await redis.xread({key: last_id}, count=100, block=None if final else block_ms)
            if not reply:
                if final:
                    if fields is not None:
                        yield self._record_event(fields)
                    return
                yield b": ping\n\n"
                # Quiet for a while: has the task ended or expired meanwhile?
                fields = await self.worker.queue.get(task_id)
                continue
            for entry_id, entry in reply[0][1]:
                last_id = entry_id
                etype, data = entry.get("type", "message"), entry.get("data", "{}")
                yield f"id: {entry_id}\nevent: {etype}\ndata: {data}\n\n".encode()
                if etype == "status" and orjson.loads(data).get("status") in FINAL_STATES:
                    fields = await self.worker.queue.get(task_id)
                    if fields is not None:
                        yield self._record_event(fields)
                    return

    @staticmethod
    def _record_event(fields: dict[str, str]) -> bytes:
        return b"event: record\ndata: " + orjson.dumps(record_view(fields)) + b"\n\n"

    async def health(self, request: Request) -> Response:
        return JSON({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        if await self.worker.ready():
            return JSON({"status": "ready", "replica": self.worker.replica_id})
        reason = "draining" if self.worker.dispatcher.draining else "redis_unavailable"
        return JSON({"status": "not_ready", "reason": reason}, status_code=503)

    async def stats(self, request: Request) -> Response:
        self.authorize(request)
        return JSON(await self.worker.stats())


async def _request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return error_answer(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSON(
        {"error": code, "message": f"{request.method} {request.url.path}: {exc.detail}."},
        exc.status_code,
    )


async def _redis_error(request: Request, exc: Exception) -> Response:
    log.error("redis_unavailable", error=str(exc), path=request.url.path)
    return JSON(
        {"error": "unavailable", "message": "The queue's Redis is unreachable; retry shortly."},
        status_code=503,
        headers={"Retry-After": "2"},
    )


class App(Starlette):
    """Starlette, with one shortcut: ``POST /v1/tasks``, the busiest route, goes straight
    to its handler, past the router and the middleware stack (about a quarter of the CPU
    of a submission). Its errors become the same answers the exception handlers give."""

    api: Api | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.api is not None
            and scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] == "/v1/tasks"
        ):
            request = Request(scope, receive)
            try:
                response = await self.api.submit(request)
            except RequestError as exc:
                response = error_answer(exc)
            except RedisError as exc:
                response = await _redis_error(request, exc)
            await response(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None, worker: Worker | None = None) -> Starlette:
    """The ASGI app; it starts and stops its :class:`Worker` with its lifespan."""
    settings = settings or (worker.settings if worker else load_settings())
    worker = worker or Worker(settings)
    api = Api(worker)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await worker.start()
        # Everything allocated so far lives as long as the process: keep it out of the
        # collector's generations, so collections stay short while serving.
        gc.freeze()
        try:
            yield
        finally:
            await asyncio.shield(worker.stop())

    routes = [
        Route("/v1/tasks", api.submit, methods=["POST"]),
        Route("/v1/tasks", api.find, methods=["GET"]),
        Route("/v1/tasks/{id}", api.get, methods=["GET"]),
        Route("/v1/tasks/{id}", api.cancel, methods=["DELETE"]),
        Route("/v1/tasks/{id}/events", api.events, methods=["GET"]),
        Route("/v1/qstash", api.qstash, methods=["POST"]),
        Route("/v1/stats", api.stats, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/ready", api.ready, methods=["GET"]),
    ]
    middleware = []
    if settings.cors_origin:
        origins = [o.strip() for o in settings.cors_origin.split(",") if o.strip()]
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=origins,
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            )
        )
    app = App(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            RequestError: _request_error,
            HTTPException: _http_error,
            RedisError: _redis_error,
        },
    )
    app.state.worker = worker
    if not middleware:  # with CORS, every request goes through its middleware
        app.api = api
    return app


def app_from_env() -> Starlette:
    """Factory for ``uvicorn --factory`` and for ``serve --workers N`` child processes."""
    from llmworker.logs import configure_logging

    settings = load_settings()
    configure_logging(settings)
    return create_app(settings)
