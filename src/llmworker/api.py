"""The HTTP API: routes, who may call them (auth.py), and the app with its worker."""

from __future__ import annotations

import asyncio
import gc
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import structlog
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from llmworker import pages, signature
from llmworker.accounts import Accounts
from llmworker.auth import DEFAULT_TENANT, Caller, KeyRing, public_id, unscoped
from llmworker.errors import (
    BadRequest,
    BodyTooLarge,
    Forbidden,
    NotConfigured,
    NotFinished,
    NotFound,
    RequestError,
    SignatureInvalid,
    Unauthorized,
)
from llmworker.httpapp import (
    JSON,
    App,
    http_error,
    non_retryable_answer,
    read_body,
    redis_error,
    request_error,
    require_json,
)
from llmworker.hub import MAX_PENDING, Entry
from llmworker.observe import tracing
from llmworker.observe.metrics import CONTENT_TYPE
from llmworker.record import ID_RE, TaskSpec, invalid_field, record_view
from llmworker.scripts import fields_of
from llmworker.settings import Settings, load_settings
from llmworker.states import FINAL_STATES
from llmworker.worker import Worker

log = structlog.get_logger("llmworker.api")

# A stream entry id: milliseconds and a sequence number, each an unsigned 64-bit integer
# in ASCII digits (Python's \d would also take other scripts' digits, which Redis refuses
# once the stream has started).
EVENT_ID_RE = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?", re.ASCII)
MAX_U64 = 2**64 - 1


def event_cursor(raw: str) -> str:
    """A ``Last-Event-ID`` or ``after`` value Redis will take; BadRequest otherwise, so a
    stream is refused before its 200 rather than cut after it."""
    match = EVENT_ID_RE.fullmatch(raw)
    if match is None or any(int(p) > MAX_U64 for p in match.groups() if p is not None):
        raise BadRequest(
            f"Last-Event-ID (or ?after=) {raw[:60]!r} is not an event id such as "
            "1764352630545-0 (the id: field of an event)."
        )
    return raw


def _shown(value: str | None, limit: int = 100) -> str | None:
    """A header value as logged: anyone can send a long one."""
    return value if value is None or len(value) <= limit else value[:limit] + "..."


def _next_id(entry_id: str) -> str | None:
    """The first stream id after ``entry_id`` (None: it was the last there can be)."""
    ms, _, seq = entry_id.partition("-")
    if int(seq or 0) < MAX_U64:
        return f"{ms}-{int(seq or 0) + 1}"
    return f"{int(ms) + 1}-0" if int(ms) < MAX_U64 else None


def sse_events(entries: list[Entry]) -> tuple[bytes, str, bool]:
    """Stream entries as SSE, up to the first final status (a task retried later starts
    a new stream of its own): the bytes, the last id sent, whether it ended there."""
    out = []
    last_id = ""
    for entry_id, entry in entries:
        last_id = entry_id
        etype, data = entry.get("type", "message"), entry.get("data", "{}")
        out.append(f"id: {entry_id}\nevent: {etype}\ndata: {data}\n\n")
        if etype == "status" and orjson.loads(data).get("status") in FINAL_STATES:
            return "".join(out).encode(), last_id, True
    return "".join(out).encode(), last_id, False


class Api:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.settings = worker.settings
        self.keys, _ = KeyRing.parse(self.settings.api_keys, self.settings.admin_keys)
        # The tenants a task can belong to: those of the keys, and QStash deliveries'.
        self.tenants = self.keys.tenants | {DEFAULT_TENANT, self.settings.qstash_tenant}
        self._open = Caller(admin=True)

    def authorize(self, request: Request) -> Caller:
        """The caller of a request, and the tenant it acts for: its key's, or for an admin
        key the one ``?tenant=`` names."""
        if self.keys.open:
            caller = self._open
        else:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            found = self.keys.caller(token.strip()) if scheme.lower() == "bearer" else None
            if found is None:
                raise Unauthorized(
                    "A valid API key is required: send 'Authorization: Bearer <key>'."
                )
            caller = found
        # Most requests have no query string: skip parsing one.
        tenant = request.query_params.get("tenant") if request.scope["query_string"] else None
        if tenant is None or tenant == caller.tenant:
            return caller
        if not caller.admin:
            raise Forbidden("Only admin keys (ADMIN_KEYS) may act for another tenant.")
        if tenant not in self.tenants:
            known = ", ".join(sorted(self.tenants))
            raise BadRequest(f"?tenant={tenant[:60]!r} is not a tenant here (tenants: {known}).")
        return Caller(tenant, admin=True)

    def _admin(self, request: Request) -> Caller:
        caller = self.authorize(request)
        if not caller.admin:
            raise Forbidden("This needs an admin key (ADMIN_KEYS): it shows every tenant.")
        return caller

    async def submit(self, request: Request) -> Response:
        try:
            caller = self.authorize(request)
            require_json(request)
            body = await read_body(request, self.settings.max_body_bytes)
            spec = TaskSpec.parse(body)
            with tracing.submit_span(request.headers, "api"):
                admitted = await self.worker.admitter.submit(spec, caller.tenant)
        except RequestError as exc:
            self.worker.metrics.rejected(exc.code)
            raise
        return await self._admitted(*admitted, caller)

    async def retry(self, request: Request) -> Response:
        """``POST /v1/tasks/{id}/retry``: a new task from a finished task's input (its
        kind, user, tier, model, callback and metadata), marked ``retry_of``."""
        try:
            ref, caller = self._task_ref(request)
            # As for submissions: a browser's cross-site form cannot send JSON.
            require_json(request, "a retry as JSON (the body {})")
            return await self._retry(request, ref, caller)
        except RequestError as exc:
            self.worker.metrics.rejected(exc.code)
            raise

    async def _retry(self, request: Request, ref: str, caller: Caller) -> Response:
        fields = await self._record(ref, caller)
        status = fields.get("status")
        if status not in FINAL_STATES:
            raise NotFinished(
                f"Task {public_id(ref)!r} is {status}: only a finished task can be retried "
                "(cancel it first to start over)."
            )
        tenant = fields.get("tenant") or DEFAULT_TENANT
        body: dict[str, Any] = {
            # Once per task: a second retry (a double click) finds the first.
            "idempotency_key": f"retry-of:{public_id(ref)}",
            "kind": fields.get("kind"),
            "input": orjson.loads(fields.get("input") or "{}"),
            "user": unscoped(tenant, fields.get("user") or "") or "anonymous",
            "tier": fields.get("tier"),
            "model": fields.get("model"),
        }
        if fields.get("callback_url"):
            body["callback_url"] = fields["callback_url"]
        if fields.get("timeout_s"):
            body["timeout_s"] = float(fields["timeout_s"])
        if fields.get("metadata"):
            body["metadata"] = orjson.loads(fields["metadata"])
        try:
            spec = TaskSpec.model_validate(body)
        except ValidationError as exc:
            raise invalid_field(exc) from None
        with tracing.submit_span(request.headers, "retry"):
            admitted = await self.worker.admitter.submit(
                spec, tenant, {"retry_of": public_id(ref)}, source="api"
            )
        # The old task points to its retry (the dashboard links them), once: a repeat
        # found the retry by its key and the mark is there. The new task exists either
        # way: a failure here must not make the caller retry again.
        if admitted[1] is not None:
            try:
                await self.worker.queue.mark(ref, "retried_as", public_id(admitted[0]))
            except (RedisError, OSError) as exc:
                log.warning("retried_as_not_noted", task_id=ref, error=str(exc))
        return await self._admitted(*admitted, caller)

    async def _admitted(
        self, ref: str, stored: dict[str, str] | None, caller: Caller | None = None
    ) -> Response:
        """202 with a new task's record; 200 with the existing one for a repeat."""
        view = record_view(stored if stored is not None else await self._record(ref))
        # An admin acting for another tenant finds the task again under that tenant.
        scope = (
            f"?tenant={view['tenant']}"
            if caller and caller.tenant != DEFAULT_TENANT and caller.admin
            else ""
        )
        headers = {"Location": f"/v1/tasks/{view['id']}{scope}"}
        if stored is not None:
            return JSON(view, status_code=202, headers=headers)
        headers["Idempotent-Replayed"] = "true"
        return JSON(view, status_code=200, headers=headers)

    async def qstash(self, request: Request) -> Response:
        """A QStash delivery: verified on the raw bytes, then admitted like a submission
        of ``QSTASH_TENANT``. 2xx frees QStash's slot at once; 429 is retried after
        Retry-After; 489 sends a task that can never be admitted to the dead-letter
        queue; 5xx only for real faults."""
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
            self.worker.metrics.rejected(exc.code)
            return non_retryable_answer(exc)
        if not self.settings.qstash_skip_verify:
            try:
                await self._verify(request, body, keys, message_id)
            except SignatureInvalid as exc:
                self.worker.metrics.rejected(exc.code)
                raise
        retried = request.headers.get("upstash-retried", "")
        delivery = {
            "qstash_message_id": message_id or "",
            "qstash_retried": retried if retried.isascii() and retried.isdigit() else "0",
        }
        try:
            # The message id is the idempotency key unless the body names one; it is
            # validated like a body field (it ends up in a key name).
            spec = TaskSpec.parse(body, idempotency_key=message_id)
            with tracing.submit_span(request.headers, "qstash"):
                admitted = await self.worker.admitter.submit(
                    spec, self.settings.qstash_tenant, delivery, source="qstash"
                )
        except RequestError as exc:
            if exc.status not in (400, 402, 422):
                self.worker.metrics.rejected(exc.code)
                raise
            # Sent again, it would be refused again: to the dead-letter queue (a user
            # without credit may be topped up and the message republished from there).
            log.warning("qstash_invalid_task", error=exc.code, message_id=_shown(message_id))
            self.worker.metrics.rejected(exc.code)
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
            log.warning(
                "qstash_refused", check=exc.code, reason=exc.message, message_id=_shown(message_id)
            )
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

    async def _record(self, ref: str, caller: Caller | None = None) -> dict[str, str]:
        fields = await self.worker.queue.get(ref) if ID_RE.match(ref.rpartition("/")[2]) else None
        if fields is None:
            shown = ref.rpartition("/")[2][:130]
            where = ""
            if caller is not None and caller.admin and self.keys.named_tenants:
                where = f" in tenant {caller.tenant!r} (admin keys name another with ?tenant=)"
            raise NotFound(
                f"No task {shown!r}{where}: it never existed or its record expired (RESULT_TTL_S)."
            )
        return fields

    def _task_ref(self, request: Request) -> tuple[str, Caller]:
        """The stored id of the task the path names, in the caller's tenant."""
        caller = self.authorize(request)
        return caller.task_ref(request.path_params["id"]), caller

    async def get(self, request: Request) -> Response:
        return JSON(record_view(await self._record(*self._task_ref(request))))

    async def find(self, request: Request) -> Response:
        """``GET /v1/tasks?idempotency_key=K``: the caller's task admitted with that key
        (for a task published through QStash, its message id)."""
        caller = self.authorize(request)
        key = request.query_params.get("idempotency_key")
        if not key:
            raise BadRequest("Name the task: GET /v1/tasks/{id}, or ?idempotency_key=...")
        ref = await self.worker.queue.find(caller.idem_ref(key))
        if ref is None:
            raise NotFound(
                f"No task with the idempotency key {key[:200]!r} (or its record expired)."
            )
        return JSON(record_view(await self._record(ref)))

    async def cancel(self, request: Request) -> Response:
        ref, caller = self._task_ref(request)
        before = None
        if ID_RE.match(ref.rpartition("/")[2]):
            before = await self.worker.queue.cancel(ref, self.settings.result_ttl_s)
        if before is None:
            await self._record(ref, caller)  # raises the 404, naming the tenant looked in
        self.worker.notifier.wake()
        fields = await self._record(ref)
        if before in ("queued", "running"):
            self.worker.metrics.finished(
                fields.get("tier", ""), fields.get("model", ""), "cancelled"
            )
        return JSON(record_view(fields))

    async def events(self, request: Request) -> Response:
        ref, caller = self._task_ref(request)
        raw = request.headers.get("last-event-id") or request.query_params.get("after")
        last_id = event_cursor(raw) if raw else "0-0"
        fields = await self._record(ref, caller)
        closing: asyncio.Event = getattr(request.state, "closing", None) or asyncio.Event()
        return StreamingResponse(
            self._stream(ref, last_id, fields, closing),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _stream(
        self, ref: str, last_id: str, fields: dict[str, str], closing: asyncio.Event
    ) -> AsyncIterator[bytes]:
        shutdown = asyncio.ensure_future(closing.wait())
        try:
            async for chunk in self._entries(ref, last_id, fields, shutdown):
                yield chunk
        except (RedisError, OSError) as exc:
            # The stream ends cleanly; the reader resumes with its Last-Event-ID.
            log.warning("event_stream_interrupted", task_id=ref, error=str(exc))
        finally:
            shutdown.cancel()

    async def _entries(
        self, ref: str, last_id: str, fields: dict[str, str], shutdown: asyncio.Future[Any]
    ) -> AsyncIterator[bytes]:
        """The task's events after ``last_id`` as SSE, then its record once it ended. A
        queued or running task is followed through the process's hub (hub.py)."""
        status: str | None = fields.get("status")
        if status not in FINAL_STATES:
            hub = self.worker.hub
            reader, status = await hub.follow(ref, last_id)
            # The server is stopping (the reader resumes elsewhere): stop waiting.
            shutdown.add_done_callback(lambda _: reader.wake())
            ended = False
            try:
                # A status that is final already: it ended before the hub followed it.
                while status not in FINAL_STATES and not ended:
                    if status is None or shutdown.done() or reader.gone:
                        return  # no such task any more, or the server stops
                    entries = await reader.next()
                    if not entries:
                        if not (shutdown.done() or reader.gone):
                            yield b": ping\n\n"
                        continue
                    if len(entries) >= MAX_PENDING:
                        hub.caught_up(reader)
                    chunk, last_id, ended = sse_events(entries)
                    yield chunk
            finally:
                hub.leave(reader)
            if ended:
                record = await self.worker.queue.get(ref)
                if record is not None:
                    yield self._record_event(record)
                return
        # An ended task: what is left of its events, then its record.
        start = _next_id(last_id)
        if start is not None:
            rest = await self.worker.queue.scripts.command(
                "XRANGE", self.worker.keys.events(ref), start, "+"
            )
            chunk, last_id, _ended = sse_events([(i, fields_of(f)) for i, f in rest])
            if chunk:
                yield chunk
        record = await self.worker.queue.get(ref)
        if record is not None:
            yield self._record_event(record)

    @staticmethod
    def _record_event(fields: dict[str, str]) -> bytes:
        return b"event: record\ndata: " + orjson.dumps(record_view(fields)) + b"\n\n"

    async def health(self, request: Request) -> Response:
        return JSON({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        # Anyone may ask (load balancers carry no key): the answer names no host or pid.
        if await self.worker.ready():
            return JSON({"status": "ready"})
        reason = "draining" if self.worker.dispatcher.draining else "redis_unavailable"
        return JSON({"status": "not_ready", "reason": reason}, status_code=503)

    async def stats(self, request: Request) -> Response:
        self._admin(request)
        return JSON(await self.worker.stats())

    async def failures(self, request: Request) -> Response:
        """``GET /v1/failures``: the latest tasks that failed or were cancelled."""
        caller = self._admin(request)
        q = request.query_params
        status = q.get("status", "")
        if status not in ("", "failed", "cancelled"):
            raise BadRequest(f"?status={status[:30]!r}: use failed or cancelled (or leave it out).")
        raw_limit = q.get("limit", "50")
        if not raw_limit.isascii() or not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 500:
            raise BadRequest(f"?limit={raw_limit[:30]!r}: a whole number from 1 to 500.")
        tenant = q.get("tenant", "") if caller.tenant == DEFAULT_TENANT else caller.tenant
        return JSON(
            await self.worker.failures(
                status, q.get("model", "")[:64], q.get("error", "")[:64], tenant, int(raw_limit)
            )
        )

    async def metrics(self, request: Request) -> Response:
        """``GET /metrics``: Prometheus text. The deployment's gauges are left out (and
        the scrape still answers) when Redis cannot be read."""
        if not self.settings.metrics_enabled:
            raise NotFound("Metrics are off here (METRICS_ENABLED=false).")
        if not self.settings.metrics_public:
            self._admin(request)
        try:
            snap = await self.worker.snapshot()
        except (RedisError, OSError) as exc:
            log.warning("metrics_without_redis", error=str(exc))
            snap = None
        return Response(self.worker.metrics.exposition(snap), media_type=CONTENT_TYPE)


def create_app(settings: Settings | None = None, worker: Worker | None = None) -> Starlette:
    """The ASGI app; it starts and stops its :class:`Worker` with its lifespan."""
    settings = settings or (worker.settings if worker else load_settings())
    worker = worker or Worker(settings)
    api = Api(worker)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        await worker.start()
        # Everything allocated so far lives as long as the process: keep it out of the
        # collector's generations, so collections stay short while serving.
        gc.freeze()
        try:
            # Set by the connections when the server starts to shut down (protocol.py):
            # event streams end at once and their readers resume on another replica.
            yield {"closing": asyncio.Event()}
        finally:
            await asyncio.shield(worker.stop())

    routes = [
        Route("/v1/tasks", api.submit, methods=["POST"]),
        Route("/v1/tasks", api.find, methods=["GET"]),
        Route("/v1/tasks/{id}", api.get, methods=["GET"]),
        Route("/v1/tasks/{id}", api.cancel, methods=["DELETE"]),
        Route("/v1/tasks/{id}/events", api.events, methods=["GET"]),
        Route("/v1/qstash", api.qstash, methods=["POST"]),
        Route("/v1/tasks/{id}/retry", api.retry, methods=["POST"]),
        Route("/v1/stats", api.stats, methods=["GET"]),
        Route("/v1/failures", api.failures, methods=["GET"]),
        *Accounts(api).routes(),
        Route("/metrics", api.metrics, methods=["GET"]),
        *pages.routes(),
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
                allow_methods=["GET", "POST", "PUT", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            )
        )
    app = App(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            RequestError: request_error,
            HTTPException: http_error,
            RedisError: redis_error,
        },
    )
    app.state.worker = worker
    # Access lines are INFO (probes DEBUG): below that level there is nothing to write,
    # and nothing to compute per request.
    app.access_log = settings.access_log and settings.log_level.upper() in ("DEBUG", "INFO")
    if not middleware:  # with CORS, every request goes through its middleware
        app.fast = api.submit
    return app


def app_from_env() -> Starlette:
    """Factory for ``uvicorn --factory`` and for ``serve --workers N`` child processes."""
    from llmworker.logs import configure_logging
    from llmworker.protocol import BoundedHttpProtocol

    settings = load_settings()
    configure_logging(settings)
    BoundedHttpProtocol.configure(settings)
    return create_app(settings)
