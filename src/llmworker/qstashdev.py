"""``llmworker qstash-dev``: a small QStash-compatible server for development and tests.

Upstash's own local server is a closed binary fetched at install time; this one is
plain Python. It speaks the part of QStash's API that producers use:

- ``POST /v2/publish/{destination}`` and ``POST /v2/enqueue/{queue}/{destination}``
  (a queue delivers one message at a time, in order), with the headers that matter:
  ``Upstash-Delay``, ``Upstash-Not-Before``, ``Upstash-Retries``,
  ``Upstash-Deduplication-Id``, ``Upstash-Content-Based-Deduplication``,
  ``Upstash-Callback``, ``Upstash-Failure-Callback``, ``Upstash-Method``,
  ``Upstash-Forward-*``;
- ``GET /v2/messages/{id}`` (a message's state) and ``GET /v2/dlq`` (the dead letters).

Deliveries are signed as QStash signs them (``Upstash-Signature`` with the configured
keys; see signature.py) and carry ``Upstash-Message-Id`` and ``Upstash-Retried``. A
failed delivery is retried on QStash's schedule, e^(2.5 n) seconds before retry n
(``--retry-scale`` shortens it), or after the answer's ``Retry-After`` when it has one;
an answer of 489 with ``Upstash-NonRetryable-Error: true``, or the last failed retry,
moves the message to the dead-letter queue. Messages live in memory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import math
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpx
import orjson
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from llmworker import signature
from llmworker.fakellm import json_response
from llmworker.providers.errors import retry_after_s

log = structlog.get_logger("llmworker.qstashdev")

DEFAULT_RETRIES = 3
MAX_BACKOFF_S = 86400.0
_DURATION_PART = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def backoff_s(retry: int) -> float:
    """QStash's wait before retry ``retry`` (1, 2, ...): e^(2.5 n) seconds, capped at a day."""
    return min(MAX_BACKOFF_S, math.exp(2.5 * retry))


def _duration_s(raw: str) -> float:
    """``90``, ``30s``, ``5m``, ``1h30m``, ``1d`` -> seconds."""
    text = raw.strip()
    if text.isdigit():
        return float(text)
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{raw!r} is not a duration such as 30s, 5m, 1h30m or 1d")
    return float(sum(int(n) * _UNITS[u] for n, u in parts))


@dataclass
class Message:
    id: str
    destination: str
    body: bytes
    method: str
    headers: dict[str, str]
    retries: int
    not_before: float
    queue: str | None = None
    callback: str | None = None
    failure_callback: str | None = None
    retried: int = 0
    state: str = "CREATED"
    created_at: float = field(default_factory=time.time)
    responses: list[dict[str, Any]] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        """As QStash's API shows a message (and, with the last answer, a dead letter)."""
        last = self.responses[-1] if self.responses else {}
        return {
            "messageId": self.id,
            "url": self.destination,
            "method": self.method,
            "queueName": self.queue,
            "header": {k: [v] for k, v in self.headers.items()},
            "body": self.body.decode("utf-8", "replace"),
            "state": self.state,
            "retried": self.retried,
            "maxRetries": self.retries,
            "notBefore": int(self.not_before * 1000),
            "createdAt": int(self.created_at * 1000),
            "callback": self.callback,
            "failureCallback": self.failure_callback,
            "responseStatus": last.get("status", 0),
            "responseBody": last.get("body", ""),
            "responses": self.responses,
        }


class QStashDev:
    def __init__(
        self,
        token: str,
        current_key: str,
        next_key: str,
        *,
        retry_scale: float = 1.0,
    ) -> None:
        self.token = token
        self.current_key = current_key
        self.next_key = next_key
        self.retry_scale = retry_scale
        self.messages: dict[str, Message] = {}
        self.dlq: list[Message] = []
        self._dedup: dict[str, str] = {}
        self._queues: dict[str, asyncio.Lock] = {}
        self._jobs: set[asyncio.Task[None]] = set()
        self._http: httpx.AsyncClient | None = None

    # -- API --------------------------------------------------------------------------

    def app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            yield
            await self.aclose()

        return Starlette(
            routes=[
                Route("/v2/publish/{destination:path}", self.publish, methods=["POST"]),
                Route("/v2/enqueue/{queue}/{destination:path}", self.publish, methods=["POST"]),
                Route("/v2/messages/{id}", self.message, methods=["GET"]),
                Route("/v2/dlq", self.dead_letters, methods=["GET"]),
            ],
            lifespan=lifespan,
        )

    def _authorized(self, request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return secrets.compare_digest(given.encode(), f"Bearer {self.token}".encode())

    async def publish(self, request: Request) -> Response:
        if not self._authorized(request):
            return json_response(
                {"error": "Unauthorized: send 'Authorization: Bearer <token>'"}, 401
            )
        destination = _destination(request)
        if not re.match(r"^https?://", destination):
            return json_response({"error": f"invalid destination url: {destination!r}"}, 400)
        body = await request.body()
        h = request.headers
        try:
            message = self._message(destination, body, h, request.path_params.get("queue"))
        except ValueError as exc:
            return json_response({"error": str(exc)}, 400)
        dedup = h.get("upstash-deduplication-id")
        if dedup is None and h.get("upstash-content-based-deduplication", "").lower() == "true":
            dedup = hashlib.sha256(destination.encode() + b"\0" + body).hexdigest()
        if dedup is not None:
            seen = self._dedup.get(dedup)
            if seen is not None:
                return json_response({"messageId": seen, "deduplicated": True})
            self._dedup[dedup] = message.id
        self.messages[message.id] = message
        self._spawn(self._run(message))
        return json_response({"messageId": message.id})

    def _message(self, destination: str, body: bytes, h: Any, queue: str | None) -> Message:
        forwarded = {
            k[len("upstash-forward-") :]: v
            for k, v in h.items()
            if k.lower().startswith("upstash-forward-")
        }
        if "content-type" in h:
            forwarded.setdefault("content-type", h["content-type"])
        not_before = time.time()
        if "upstash-delay" in h:
            not_before += _duration_s(h["upstash-delay"])
        if "upstash-not-before" in h:
            not_before = max(not_before, float(h["upstash-not-before"]))
        retries = int(h.get("upstash-retries", DEFAULT_RETRIES))
        return Message(
            id="msg_" + secrets.token_hex(16),
            destination=destination,
            body=body,
            method=h.get("upstash-method", "POST").upper(),
            headers=forwarded,
            retries=max(0, retries),
            not_before=not_before,
            queue=queue,
            callback=h.get("upstash-callback"),
            failure_callback=h.get("upstash-failure-callback"),
        )

    async def message(self, request: Request) -> Response:
        if not self._authorized(request):
            return json_response({"error": "Unauthorized"}, 401)
        found = self.messages.get(request.path_params["id"])
        if found is None:
            return json_response({"error": "message not found"}, 404)
        return json_response(found.view())

    async def dead_letters(self, request: Request) -> Response:
        if not self._authorized(request):
            return json_response({"error": "Unauthorized"}, 401)
        return json_response({"messages": [m.view() | {"dlqId": m.id} for m in self.dlq]})

    # -- delivery -----------------------------------------------------------------------

    def _spawn(self, job: Any) -> None:
        task = asyncio.ensure_future(job)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    async def _run(self, message: Message) -> None:
        try:
            await self._schedule(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or an unusable destination: dead-letter it
            log.exception("qstash_dev_failed", message_id=message.id)
            message.responses.append({"status": 0, "body": "", "error": str(exc)})
            message.state = "FAILED"
            self.dlq.append(message)

    async def _schedule(self, message: Message) -> None:
        await asyncio.sleep(max(0.0, message.not_before - time.time()))
        if message.queue is None:
            await self._deliver_until_done(message)
            return
        # A queue hands its destination one message at a time, in order.
        lock = self._queues.setdefault(message.queue, asyncio.Lock())
        async with lock:
            await self._deliver_until_done(message)

    async def _deliver_until_done(self, message: Message) -> None:
        message.state = "ACTIVE"
        while True:
            status, headers, body, error = await self._attempt(message)
            message.responses.append(
                {
                    "status": status,
                    "body": body[:2000].decode("utf-8", "replace"),
                    "error": error,
                    "retried": message.retried,
                }
            )
            if 200 <= status < 300:
                message.state = "DELIVERED"
                log.info("qstash_dev_delivered", message_id=message.id, status=status)
                if message.callback:
                    await self._callback(message.callback, message, status, headers, body)
                return
            final = status == 489 and headers.get("upstash-nonretryable-error") == "true"
            if final or message.retried >= message.retries:
                message.state = "FAILED"
                self.dlq.append(message)
                log.warning("qstash_dev_dead_letter", message_id=message.id, status=status)
                if message.failure_callback:
                    await self._callback(message.failure_callback, message, status, headers, body)
                return
            message.retried += 1
            wait = retry_after_s(headers)
            if wait is None:
                wait = backoff_s(message.retried) * self.retry_scale
            log.info("qstash_dev_retry", message_id=message.id, status=status, wait_s=wait)
            message.state = "RETRY"
            await asyncio.sleep(wait)
            message.state = "ACTIVE"

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=30, follow_redirects=False)
        return self._http

    def signed_headers(self, url: str, body: bytes) -> dict[str, str]:
        return {"Upstash-Signature": signature.sign(self.current_key, body, url)}

    async def _attempt(self, message: Message) -> tuple[int, dict[str, str], bytes, str | None]:
        headers = {
            **message.headers,
            **self.signed_headers(message.destination, message.body),
            "Upstash-Message-Id": message.id,
            "Upstash-Retried": str(message.retried),
        }
        try:
            r = await self.http.request(
                message.method, message.destination, content=message.body, headers=headers
            )
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            return 0, {}, b"", f"{type(exc).__name__}: {exc}"
        return r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content, None

    async def _callback(
        self, url: str, message: Message, status: int, headers: dict[str, str], body: bytes
    ) -> None:
        payload = orjson.dumps(
            {
                "status": status,
                "header": {k: [v] for k, v in headers.items()},
                "body": base64.b64encode(body).decode(),
                "retried": message.retried,
                "maxRetries": message.retries,
                "sourceMessageId": message.id,
                "url": message.destination,
                "method": message.method,
                "sourceHeader": {k: [v] for k, v in message.headers.items()},
                "sourceBody": base64.b64encode(message.body).decode(),
            }
        )
        headers = {**self.signed_headers(url, payload), "Content-Type": "application/json"}
        try:
            await self.http.post(url, content=payload, headers=headers)
        except httpx.HTTPError as exc:
            log.warning("qstash_dev_callback_failed", url=url, error=str(exc))

    async def aclose(self) -> None:
        for task in list(self._jobs):
            task.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()


def _destination(request: Request) -> str:
    """The destination URL after ``/v2/publish/`` or ``/v2/enqueue/<queue>/``, as sent:
    raw (``https://app/x?a=1``) or percent-encoded whole (``https%3A%2F%2Fapp...``),
    decoded once."""
    raw = request.scope.get("raw_path", request.url.path.encode()).decode("latin-1")
    marker = "/v2/publish/" if raw.startswith("/v2/publish/") else "/v2/enqueue/"
    rest = raw[len(marker) :]
    if marker == "/v2/enqueue/":
        rest = rest.split("/", 1)[1] if "/" in rest else ""
    if request.url.query:
        rest += "?" + request.url.query
    return unquote(rest) if re.match(r"^https?%3A", rest, re.IGNORECASE) else rest
