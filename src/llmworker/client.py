"""Producer helpers for Python apps: submit tasks, wait for results, follow events.

::

    from llmworker.client import Client

    with Client("https://worker.example.com", api_key="...") as worker:
        task = worker.submit("chat", {"messages": [{"role": "user", "content": "Hi"}]},
                             user="u42", tier="paid")
        for event in worker.events(task["id"]):
            if event.type == "tokens":
                print(event.data["text"], end="", flush=True)
        print(worker.get(task["id"])["result"])

:class:`AsyncClient` has the same methods, awaited. Both can also publish through
QStash (:meth:`Client.publish`): QStash delivers the task to the worker's ``/v1/qstash``
and retries until the worker has queued it.

The URL and key default to ``LLMWORKER_URL`` and ``LLMWORKER_API_KEY``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx
import orjson

from llmworker.errors import ConfigError, LLMWorkerError
from llmworker.states import FINAL_STATES

DEFAULT_URL = "http://127.0.0.1:8080"
# A dropped event stream is resumed after 0.5, 1, 2, 4 and 8 s; then the error is raised
# (the worker is down, or the URL is wrong).
RECONNECTS = 5
# Answers that mean "come back": a proxy in front of replicas that restart.
RETRIED_STATUSES = frozenset({502, 503, 504})


class ApiError(LLMWorkerError):
    """The worker refused a request: ``status`` (HTTP), ``code`` and ``message`` as it
    answered them, and ``retry_after_s`` with a 429."""

    def __init__(self, status: int, body: Any) -> None:
        if isinstance(body, dict):
            code, message = str(body.get("error", "http_error")), str(body.get("message", body))
        else:
            code, message = "http_error", str(body)
        super().__init__(message)
        self.status = status
        self.code = code
        self.body = body
        self.retry_after_s: float | None = None

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


class WorkerUnreachable(LLMWorkerError):
    """The worker could not be reached (not running, wrong URL, network)."""

    def __init__(self, url: str, exc: Exception) -> None:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            message = (
                f"Cannot reach the worker at {url}: {exc or type(exc).__name__} (is "
                "`llmworker serve` running there? LLMWORKER_URL or the client's url points "
                "elsewhere)"
            )
        else:  # reached, then lost: a request may have been taken before it broke
            message = f"The connection to the worker at {url} failed: {type(exc).__name__} {exc}"
        super().__init__(message)
        self.url = url


@dataclass(frozen=True)
class Event:
    """One of a task's events: ``type`` is status, progress, tokens, reasoning or record
    (the final record, last); ``id`` is the event's own id (None for the record), to
    resume after."""

    id: str | None
    type: str
    data: dict[str, Any]


def task_body(kind: str, input: Any, **fields: Any) -> dict[str, Any]:
    """A submission's JSON body; fields that are None are left out."""
    return {"kind": kind, "input": {} if input is None else input} | {
        k: v for k, v in fields.items() if v is not None
    }


def usage_query(query: dict[str, Any]) -> dict[str, str]:
    """The usage endpoints' parameters: ``since``/``until`` are ``from``/``to``."""
    names = {"since": "from", "until": "to"}
    return {names.get(k, k): str(v) for k, v in query.items() if v is not None}


def _answer(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = response.text
    if response.status_code >= 400:
        error = ApiError(response.status_code, body)
        if "retry-after" in response.headers:
            with contextlib.suppress(ValueError):
                error.retry_after_s = float(response.headers["retry-after"])
        raise error
    return body


class _Stream:
    """Where one task's event stream stands: the SSE parser, the last event id (to resume
    after), and how many reconnections failed in a row."""

    def __init__(self, last_event_id: str | None, reconnects: int) -> None:
        self.last = last_event_id or "0-0"
        self.reconnects = reconnects
        self.failures = 0
        self.id: str | None = None
        self.type = "message"
        self.data: list[str] = []

    @property
    def headers(self) -> dict[str, str]:
        return {"Last-Event-ID": self.last}

    def feed(self, line: str) -> Event | None:
        """One line of the stream; the event it completes, if any."""
        if not line:
            if not self.data:
                self.type = "message"
                return None
            event = Event(self.id, self.type, orjson.loads("\n".join(self.data)))
            self.id, self.type, self.data = None, "message", []
            self.failures = 0
            if event.id:
                self.last = event.id
            return event
        if line.startswith(":"):
            return None  # a keep-alive comment
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            self.id = value
        elif name == "event":
            self.type = value
        elif name == "data":
            self.data.append(value)
        return None

    def ended(self) -> float:
        """The stream ended cleanly but the task goes on (its replica stopped): seconds
        before following it again."""
        self.type, self.data = "message", []
        return 0.1

    def dropped(self, exc: Exception, url: str) -> float:
        """Seconds to wait before reconnecting after ``exc``; raises once the worker has
        stayed unreachable for ``reconnects`` tries. Refusals (404, 401 ...) are raised at
        once; 502, 503 and 504 (a proxy whose replicas restart) are retried."""
        if isinstance(exc, ApiError) and exc.status not in RETRIED_STATUSES:
            raise exc
        self.failures += 1
        self.type, self.data = "message", []
        if self.failures > self.reconnects:
            if isinstance(exc, httpx.TransportError):
                raise WorkerUnreachable(url, exc) from exc
            raise exc
        return 0.25 * 2.0**self.failures


class _Delivery:
    """Waiting for QStash to deliver a message: growing pauses, within a deadline."""

    def __init__(self, timeout_s: float | None, message_id: str) -> None:
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.message_id = message_id
        self.delay = 0.05

    def left(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def next(self) -> float:
        left = self.left()
        if left is not None and left <= 0:
            raise TimeoutError(f"QStash message {self.message_id} was not delivered in time")
        self.delay = min(self.delay * 2, 1.0)
        return self.delay if left is None else min(self.delay, left)


class _Base:
    def __init__(
        self, url: str | None, api_key: str | None, reconnects: int, tenant: str | None
    ) -> None:
        self.url = (url or os.environ.get("LLMWORKER_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get("LLMWORKER_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        # An admin key acts for this tenant (?tenant= on every request).
        self.params = {"tenant": tenant} if tenant else None
        self.reconnects = reconnects
        self._qstash: dict[tuple[str, str | None], Any] = {}

    def _publishing(
        self,
        factory: Any,
        kind: str,
        input: Any,
        qstash_token: str | None,
        qstash_url: str | None,
        worker_url: str | None,
        deduplication_id: str | None,
        delay: str | int | None,
        fields: dict[str, Any],
    ) -> tuple[Any, dict[str, Any]]:
        """The QStash client (one per token and URL) and the arguments of a publish."""
        token = qstash_token or os.environ.get("QSTASH_TOKEN")
        if not token:
            raise ConfigError(
                [
                    "QSTASH_TOKEN is not set: publish() sends through QStash and needs its "
                    "token (Upstash console, QStash), as qstash_token= or in the environment"
                ]
            )
        base_url = qstash_url or os.environ.get("QSTASH_URL")
        qstash = self._qstash.get((token, base_url))
        if qstash is None:
            qstash = self._qstash[(token, base_url)] = factory(token, base_url=base_url)
        target = (worker_url or os.environ.get("PUBLIC_URL") or self.url).rstrip("/")
        args: dict[str, Any] = {
            "url": f"{target}/v1/qstash",
            "body": task_body(kind, input, **fields),
        }
        if deduplication_id is not None:
            args["deduplication_id"] = deduplication_id
        if delay is not None:
            args["delay"] = delay
        return qstash, args


class Client(_Base):
    """The worker's HTTP API, synchronously."""

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        reconnects: int = RECONNECTS,
        tenant: str | None = None,
    ) -> None:
        super().__init__(url, api_key, reconnects, tenant)
        self.http = httpx.Client(
            base_url=self.url, headers=self.headers, params=self.params, timeout=timeout_s
        )

    def _request(self, method: str, path: str, **options: Any) -> Any:
        try:
            return _answer(self.http.request(method, path, **options))
        except httpx.TransportError as exc:
            raise WorkerUnreachable(self.url, exc) from exc

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def submit(self, kind: str, input: Any = None, **fields: Any) -> dict[str, Any]:
        """Queue a task (fields: user, tier, model, id, idempotency_key, callback_url,
        timeout_s, metadata); its record. :class:`ApiError` when refused."""
        return dict(self._request("POST", "/v1/tasks", json=task_body(kind, input, **fields)))

    def get(self, task_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/tasks/{task_id}"))

    def find(self, idempotency_key: str) -> dict[str, Any]:
        """The task admitted with this key (a QStash message id, for a published one)."""
        params = {"idempotency_key": idempotency_key}
        return dict(self._request("GET", "/v1/tasks", params=params))

    def cancel(self, task_id: str) -> dict[str, Any]:
        return dict(self._request("DELETE", f"/v1/tasks/{task_id}"))

    def retry(self, task_id: str) -> dict[str, Any]:
        """A new task from a finished task's input; its record (``retry_of`` names the old)."""
        return dict(self._request("POST", f"/v1/tasks/{task_id}/retry", json={}))

    def stats(self) -> dict[str, Any]:
        return dict(self._request("GET", "/v1/stats"))

    def usage(self, **query: Any) -> dict[str, Any]:
        """Token and cost totals (``since``, ``until``: YYYY-MM-DD or ``7d``; ``group_by``:
        day, model, tier or user; ``user``, ``tier``, ``model`` filter)."""
        return dict(self._request("GET", "/v1/usage", params=usage_query(query)))

    def usage_entries(self, **query: Any) -> dict[str, Any]:
        """The ledger's entries, oldest first (``since``, ``until``, ``user``, ``tier``,
        ``model``, ``limit``); ``truncated`` when more match."""
        return dict(self._request("GET", "/v1/usage/entries", params=usage_query(query)))

    def quota(self, user: str, tier: str | None = None) -> dict[str, Any]:
        params = {"tier": tier} if tier else {}
        return dict(self._request("GET", f"/v1/users/{quote(user, safe='')}/quota", params=params))

    def set_quota(self, user: str, **limits: float | None) -> dict[str, Any]:
        """The user's own limits (tasks_per_day ... usd_per_month; None: the tier's)."""
        return dict(self._request("PUT", f"/v1/users/{quote(user, safe='')}/quota", json=limits))

    def add_credits(self, user: str, **amount: Any) -> dict[str, Any]:
        """Prepaid credit: ``usd``, ``tokens``, and a ``reference`` that applies it once."""
        path = f"/v1/users/{quote(user, safe='')}/credits"
        return dict(self._request("POST", path, json=amount))

    def events(self, task_id: str, last_event_id: str | None = None) -> Iterator[Event]:
        """The task's events as they happen, ending with its final record; a dropped
        stream is resumed after the last event seen."""
        stream = _Stream(last_event_id, self.reconnects)
        path = f"/v1/tasks/{task_id}/events"
        while True:
            try:
                with self.http.stream("GET", path, headers=stream.headers, timeout=None) as r:
                    if r.status_code >= 400:
                        r.read()
                        _answer(r)
                    for line in r.iter_lines():
                        event = stream.feed(line)
                        if event is not None:
                            yield event
                            if event.type == "record":
                                return
                # The stream ended without the record: the task expired meanwhile, or
                # the replica serving it stopped (then follow it on another one).
                record = self.get(task_id)
                if record.get("status") in FINAL_STATES:
                    yield Event(None, "record", record)
                    return
                time.sleep(stream.ended())
            except (httpx.TransportError, WorkerUnreachable, ApiError) as exc:
                time.sleep(stream.dropped(exc, self.url))

    def wait(self, task_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        """The task's final record: following its events, or, with ``timeout_s``, asking
        for the record until then (TimeoutError after)."""
        if timeout_s is None:
            for event in self.events(task_id):
                if event.type == "record":
                    return event.data
        deadline = time.monotonic() + (timeout_s or 0)
        while True:
            record = self.get(task_id)
            if record.get("status") in FINAL_STATES:
                return record
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"task {task_id} did not finish within {timeout_s} s")
            time.sleep(min(0.2, left))

    def run(self, kind: str, input: Any = None, **fields: Any) -> dict[str, Any]:
        """Submit and wait: the final record."""
        return self.wait(self.submit(kind, input, **fields)["id"])

    def wait_published(self, message_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        """The final record of a task published through QStash: found by its message id
        once QStash has delivered it (until then the worker answers 404), then followed
        to its end. TimeoutError after ``timeout_s``."""
        delays = _Delivery(timeout_s, message_id)
        while True:
            try:
                found = self.find(message_id)
                break
            except ApiError as exc:
                if exc.status != 404:
                    raise
            time.sleep(delays.next())
        return self.wait(found["id"], delays.left())

    def publish(
        self,
        kind: str,
        input: Any = None,
        *,
        qstash_token: str | None = None,
        qstash_url: str | None = None,
        worker_url: str | None = None,
        deduplication_id: str | None = None,
        delay: str | int | None = None,
        **fields: Any,
    ) -> str:
        """Publish the task through QStash to the worker's ``/v1/qstash`` (``worker_url``,
        else PUBLIC_URL, else this client's URL); QStash's message id, which becomes the
        task's idempotency key (see :meth:`find`)."""
        from qstash import QStash

        qstash, args = self._publishing(
            QStash, kind, input, qstash_token, qstash_url, worker_url, deduplication_id, delay,
            fields,
        )  # fmt: skip
        return str(qstash.message.publish_json(**args).message_id)


class AsyncClient(_Base):
    """The worker's HTTP API, for asyncio apps; the methods of :class:`Client`, awaited."""

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        reconnects: int = RECONNECTS,
        tenant: str | None = None,
    ) -> None:
        super().__init__(url, api_key, reconnects, tenant)
        self.http = httpx.AsyncClient(
            base_url=self.url, headers=self.headers, params=self.params, timeout=timeout_s
        )

    async def _request(self, method: str, path: str, **options: Any) -> Any:
        try:
            return _answer(await self.http.request(method, path, **options))
        except httpx.TransportError as exc:
            raise WorkerUnreachable(self.url, exc) from exc

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def submit(self, kind: str, input: Any = None, **fields: Any) -> dict[str, Any]:
        return dict(await self._request("POST", "/v1/tasks", json=task_body(kind, input, **fields)))

    async def get(self, task_id: str) -> dict[str, Any]:
        return dict(await self._request("GET", f"/v1/tasks/{task_id}"))

    async def find(self, idempotency_key: str) -> dict[str, Any]:
        params = {"idempotency_key": idempotency_key}
        return dict(await self._request("GET", "/v1/tasks", params=params))

    async def cancel(self, task_id: str) -> dict[str, Any]:
        return dict(await self._request("DELETE", f"/v1/tasks/{task_id}"))

    async def retry(self, task_id: str) -> dict[str, Any]:
        return dict(await self._request("POST", f"/v1/tasks/{task_id}/retry", json={}))

    async def stats(self) -> dict[str, Any]:
        return dict(await self._request("GET", "/v1/stats"))

    async def usage(self, **query: Any) -> dict[str, Any]:
        return dict(await self._request("GET", "/v1/usage", params=usage_query(query)))

    async def quota(self, user: str, tier: str | None = None) -> dict[str, Any]:
        params = {"tier": tier} if tier else {}
        path = f"/v1/users/{quote(user, safe='')}/quota"
        return dict(await self._request("GET", path, params=params))

    async def events(self, task_id: str, last_event_id: str | None = None) -> AsyncIterator[Event]:
        stream = _Stream(last_event_id, self.reconnects)
        path = f"/v1/tasks/{task_id}/events"
        while True:
            try:
                async with self.http.stream("GET", path, headers=stream.headers, timeout=None) as r:
                    if r.status_code >= 400:
                        await r.aread()
                        _answer(r)
                    async for line in r.aiter_lines():
                        event = stream.feed(line)
                        if event is not None:
                            yield event
                            if event.type == "record":
                                return
                record = await self.get(task_id)
                if record.get("status") in FINAL_STATES:
                    yield Event(None, "record", record)
                    return
                await asyncio.sleep(stream.ended())
            except (httpx.TransportError, WorkerUnreachable, ApiError) as exc:
                await asyncio.sleep(stream.dropped(exc, self.url))

    async def wait(self, task_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        async def follow() -> dict[str, Any]:
            async for event in self.events(task_id):
                if event.type == "record":
                    return event.data
            raise AssertionError("unreachable: events() ends with the record")

        try:
            return await asyncio.wait_for(follow(), timeout_s)
        except TimeoutError:
            raise TimeoutError(f"task {task_id} did not finish within {timeout_s} s") from None

    async def run(self, kind: str, input: Any = None, **fields: Any) -> dict[str, Any]:
        return await self.wait((await self.submit(kind, input, **fields))["id"])

    async def wait_published(
        self, message_id: str, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """As :meth:`Client.wait_published`."""
        delays = _Delivery(timeout_s, message_id)
        while True:
            try:
                found = await self.find(message_id)
                break
            except ApiError as exc:
                if exc.status != 404:
                    raise
            await asyncio.sleep(delays.next())
        return await self.wait(found["id"], delays.left())

    async def publish(
        self,
        kind: str,
        input: Any = None,
        *,
        qstash_token: str | None = None,
        qstash_url: str | None = None,
        worker_url: str | None = None,
        deduplication_id: str | None = None,
        delay: str | int | None = None,
        **fields: Any,
    ) -> str:
        """As :meth:`Client.publish`."""
        from qstash import AsyncQStash

        qstash, args = self._publishing(
            AsyncQStash, kind, input, qstash_token, qstash_url, worker_url, deduplication_id,
            delay, fields,
        )  # fmt: skip
        return str((await qstash.message.publish_json(**args)).message_id)
