"""Callbacks: when a task with a ``callback_url`` reaches a final state, its record is
POSTed there, signed as Standard Webhooks do.

The callback is durable: the script that records the final state also puts the task in
the callback outbox (``keys.callbacks``), so it survives the replica that finished the
task. Every replica runs a :class:`Notifier` that takes due callbacks (each taken
callback stays invisible to the others while one attempt runs), delivers, and records
the outcome: delivered (it leaves the outbox: at most one successful delivery), retry
later (exponential backoff with jitter, a receiver's ``Retry-After`` honoured), or failed
once ``CALLBACK_DEADLINE_S`` has passed since the final state.

Receivers dedupe on ``webhook-id``, which is the same for every attempt of one final
state. The signature is ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` keyed by
``CALLBACK_SECRET`` (a ``whsec_<base64>`` secret), so the ``standardwebhooks`` library
verifies it as it is.

Callbacks never go to internal addresses unless allowed: without
``CALLBACK_ALLOWED_HOSTS`` a host must resolve only to public addresses (checked when
connecting, so DNS cannot be switched in between); with it, only the listed hosts are
accepted, and they may be internal (``app:3000`` on a Docker network).

With ``CALLBACK_VIA=qstash`` the signed callback is published through QStash instead,
which then does the retrying.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import random
import re
import socket
import time
from typing import Any, Literal

import aiohttp
import orjson
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from llmworker import __version__
from llmworker.errors import InvalidField
from llmworker.observe import tracing
from llmworker.observe.metrics import Metrics, NoMetrics
from llmworker.providers.errors import retry_after_s
from llmworker.queue import Queue
from llmworker.record import record_view
from llmworker.settings import Settings
from llmworker.webhooks import sign, signing_key, webhook_id

log = structlog.get_logger("llmworker.notify")

BATCH = 32
BACKOFF_MAX_S = 600.0
# A callback being attempted stays invisible to other replicas this long, renewed every
# third of it while the attempt runs: one cut off by a dead replica is due again within
# seconds.
VISIBILITY_S = 6.0
# Nothing due: look at the outbox again after this long anyway (a callback left behind by
# a replica that died during its attempt becomes due again while this one sleeps).
IDLE_WAIT_S = 30.0


# -- where callbacks may go ------------------------------------------------------------


def _host_allowed(host: str, port: int | None, allowed: list[str]) -> bool:
    for entry in allowed:
        name, _, want_port = entry.rpartition(":") if _has_port(entry) else (entry, "", "")
        if want_port and str(port) != want_port:
            continue
        if name.startswith("*."):
            if host.endswith(name[1:]) and host != name[2:]:
                return True
        elif host == name:
            return True
    return False


def _has_port(entry: str) -> bool:
    head, sep, tail = entry.rpartition(":")
    return bool(sep) and tail.isdigit() and "]" not in tail and head.count(":") == 0


# IPv6 prefixes that carry an IPv4 address a gateway may turn into that IPv4 address:
# IPv4-compatible (deprecated) and NAT64 (well-known and local-use).
_EMBEDS_IPV4 = [ipaddress.ip_network(n) for n in ("::/96", "64:ff9b::/96", "64:ff9b:1::/48")]


def _is_public(address: str) -> bool:
    """Public, and carrying no internal IPv4 address inside an IPv6 one."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if not ip.is_global:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        inner = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
        if any(ip in net for net in _EMBEDS_IPV4):
            inner.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        return all(v4 is None or v4.is_global for v4 in inner)
    return True


# A host name's labels: letters, digits, hyphens inside (underscores too, which some
# internal names use), 1-63 characters each.
_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?", re.ASCII)


# Anything a URL must not carry raw: whitespace and control characters (yarl would drop a
# NUL from a host silently, so the URL connected to would not be the one checked).
_RAW_FORBIDDEN_RE = re.compile(r"[\s\x00-\x1f\x7f]")
# WHATWG URLs read a host whose last label is a number as an IPv4 address, in any of
# inet_aton's forms (0x7f000001, 2130706433, 127.1, 0177.0.0.1): so do resolvers.
_NUMERIC_LABEL_RE = re.compile(r"(?:[0-9]+|0[xX][0-9a-fA-F]*)", re.ASCII)


def _bad_url(message: str) -> InvalidField:
    return InvalidField("callback_url", message)


def _callback_host(url: str) -> tuple[str, int | None]:
    """The host and port the HTTP client will connect to; InvalidField for a URL it
    would read otherwise than it reads, or not at all."""
    if _RAW_FORBIDDEN_RE.search(url):
        raise _bad_url("The callback URL must not contain spaces or control characters.")
    try:
        # The host as the HTTP client will connect to it: yarl folds Unicode digits and
        # full stops ("①②⑦。0。0。1") into ASCII, which urlsplit would leave alone.
        parsed = URL(url)
        host = (parsed.host or "").lower().rstrip(".")
        port = parsed.explicit_port
    except ValueError as exc:
        raise _bad_url(f"The callback URL {url[:200]!r} is not a valid URL: {exc}.") from None
    if parsed.scheme not in ("http", "https") or not host:
        raise _bad_url("The callback URL must be an http:// or https:// URL.")
    if port == 0:
        raise _bad_url("The callback URL's port must be 1-65535.")
    if _NUMERIC_LABEL_RE.fullmatch(host.rsplit(".", 1)[-1]):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise _bad_url(
                f"The callback host {host!r} is not a canonical IPv4 address: write it as "
                "four decimal numbers (a.b.c.d) or use a name."
            ) from None
    elif ":" not in host and not all(_LABEL_RE.fullmatch(x) for x in host.split(".")):
        raise _bad_url(f"The callback host {host!r} is not a valid host name.")
    return host, port


def check_callback_url(url: str, settings: Settings) -> None:
    """Refuse a callback this worker must never deliver (at admission, and again before
    each attempt: the settings may have changed)."""
    host, port = _callback_host(url)
    if not settings.callback_secret and settings.callback_via != "qstash":
        raise _bad_url(
            "This worker sends no callbacks: set CALLBACK_SECRET (callbacks are signed)."
        )
    where = f"{host}:{port}" if port is not None else host
    allowed = settings.callback_hosts
    if allowed:
        if not _host_allowed(host, port, allowed):
            raise _bad_url(
                f"Callbacks may not go to {where!r}: it is not in CALLBACK_ALLOWED_HOSTS."
            )
        return
    internal = host == "localhost" or host.endswith((".localhost", ".internal", ".local"))
    with contextlib.suppress(ValueError):
        internal = internal or not _is_public(str(ipaddress.ip_address(host)))
    if internal:
        raise _bad_url(
            f"Callbacks may not go to the internal address {where!r}; list it in "
            "CALLBACK_ALLOWED_HOSTS to allow it."
        )


class InternalAddress(OSError):
    """A callback host resolved only to addresses callbacks may not go to: no later
    attempt can succeed."""


class _PublicOnlyResolver(AbstractResolver):
    """Resolves like the default resolver, then drops every non-public address unless the
    host is allowed explicitly: the check happens on the addresses actually connected to."""

    def __init__(self, allowed: list[str]) -> None:
        self.allowed = allowed
        self.inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self.inner.resolve(host, port, family)
        if self.allowed and _host_allowed(host.lower(), port, self.allowed):
            return found
        public = [r for r in found if _is_public(r["host"])]
        if not public:
            raise InternalAddress(
                f"{host} resolves only to internal addresses; callbacks may not go there"
            )
        return public

    async def close(self) -> None:
        await self.inner.close()


# -- delivery --------------------------------------------------------------------------


class DeliveryFailed(Exception):
    """One attempt failed; ``retry_after_s`` when the receiver said when to come back;
    ``final`` when no later attempt can succeed."""

    def __init__(
        self, message: str, retry_after_s: float | None = None, *, final: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.final = final


# QStash retries a published callback itself, with the signature made at publishing: two
# retries (after ~12 s and ~2.5 min) stay within the five minutes in which Standard
# Webhooks receivers accept a signature's timestamp.
QSTASH_CALLBACK_RETRIES = 2


class Notifier:
    """Delivers the callbacks of finished tasks, from the outbox every replica shares."""

    def __init__(self, settings: Settings, queue: Queue, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.queue = queue
        self.metrics = metrics or NoMetrics()
        self.key = signing_key(settings.callback_secret) if settings.callback_secret else None
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._qstash: Any = None
        self._loop: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        # Attempts running here: task id -> (the attempt, its asyncio task).
        self._inflight: dict[str, tuple[str, asyncio.Task[None]]] = {}

    def start(self) -> None:
        self._loop = asyncio.create_task(self._forever(), name="llmworker-notify")
        self._renewer = asyncio.create_task(self._renew_forever(), name="llmworker-notify-renew")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        for loop in (self._loop, self._renewer):
            if loop is not None:
                loop.cancel()
                await asyncio.gather(loop, return_exceptions=True)
        cut = dict(self._inflight)
        for _attempt, task in cut.values():
            task.cancel()
        await asyncio.gather(*(task for _, task in cut.values()), return_exceptions=True)
        # Attempts cut short here are due again now, for another replica.
        for task_id, (attempt, _task) in cut.items():
            with contextlib.suppress(Exception):
                await self.queue.callback_end(
                    task_id, attempt, "retry", 0, "the replica stopped during the attempt"
                )
        if self._session is not None:
            await self._session.close()

    @property
    def visibility_ms(self) -> int:
        return int(VISIBILITY_S * 1000)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(VISIBILITY_S / 3)
            attempts = {task_id: attempt for task_id, (attempt, _) in self._inflight.items()}
            if not attempts:
                continue
            try:
                await self.queue.callback_renew(self.visibility_ms, attempts)
            except Exception as exc:  # Redis away: the attempts may be taken over; dedupe
                log.warning("callback_renew_failed", error=str(exc))

    async def _forever(self) -> None:
        failures = 0
        while True:
            self._wake.clear()
            try:
                records, next_ms, expired = await self.queue.callback_claim(
                    BATCH, self.visibility_ms
                )
                failures = 0
            except Exception as exc:
                failures += 1
                if failures % 10 == 1:
                    log.warning("callback_outbox_unreachable", error=str(exc))
                await asyncio.sleep(min(2.0, 0.1 * 2**failures))
                continue
            if expired:
                log.warning(
                    "callbacks_expired",
                    count=expired,
                    hint="their task records expired first: keep RESULT_TTL_S above "
                    "CALLBACK_DEADLINE_S",
                )
            for fields in records:
                task_id = fields["id"]
                task = asyncio.create_task(self._attempt(fields))
                self._inflight[task_id] = (fields.get("cb_attempts") or "1", task)
                task.add_done_callback(functools.partial(self._forget, task_id))
            if len(records) == BATCH:
                continue
            wait_s = IDLE_WAIT_S if next_ms < 0 else min(IDLE_WAIT_S, next_ms / 1000 + 0.005)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait_s)

    def _forget(self, task_id: str, done: asyncio.Task[None]) -> None:
        if self._inflight.get(task_id, ("", None))[1] is done:
            del self._inflight[task_id]

    async def _attempt(self, fields: dict[str, str]) -> None:
        try:
            await self._attempt_once(fields)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis went away: the callback is due again later
            log.warning("callback_outcome_not_recorded", task_id=fields["id"], error=str(exc))

    async def _attempt_once(self, fields: dict[str, str]) -> None:
        task_id, url = fields["id"], fields.get("callback_url", "")
        attempt = fields.get("cb_attempts") or "1"
        try:
            async with asyncio.timeout(self.settings.callback_timeout_s):
                await self.deliver(fields)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failure = (
                exc
                if isinstance(exc, DeliveryFailed)
                else DeliveryFailed(f"{url}: {type(exc).__name__}: {exc}")
            )
            await self._failed(fields, attempt, failure)
            return
        outcome: Literal["delivered", "published"] = (
            "published" if self.settings.callback_via == "qstash" else "delivered"
        )
        self.metrics.callback("delivered")
        if await self.queue.callback_end(task_id, attempt, outcome):
            log.info("callback_" + outcome, task_id=task_id, attempts=int(attempt))

    async def _failed(self, fields: dict[str, str], attempt: str, failure: DeliveryFailed) -> None:
        task_id, error = fields["id"], str(failure)
        # Not before the receiver's Retry-After, not sooner than the backoff, never
        # later than the longest backoff.
        delay = min(BACKOFF_MAX_S, max(failure.retry_after_s or 0.0, self._backoff(int(attempt))))
        finished_s = int(fields.get("finished_at") or 0) / 1000
        give_up_at = finished_s + self.settings.callback_deadline_s
        if failure.final or time.time() + delay > give_up_at:
            log.error("callback_failed", task_id=task_id, attempts=int(attempt), error=error)
            self.metrics.callback("failed")
            await self.queue.callback_end(task_id, attempt, "failed", 0, error)
            return
        log.warning(
            "callback_retry", task_id=task_id, attempts=int(attempt), delay_s=round(delay, 1),
            error=error,
        )  # fmt: skip
        self.metrics.callback("retry")
        await self.queue.callback_end(task_id, attempt, "retry", int(delay * 1000), error)
        self._wake.set()  # the loop sleeps until the next due time: this one may be sooner

    def _backoff(self, attempts: int) -> float:
        ceiling = min(BACKOFF_MAX_S, self.settings.callback_backoff_s * 2 ** (attempts - 1))
        return random.uniform(ceiling / 2, ceiling)

    def payload(self, fields: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        """The body and Standard Webhooks headers of a task's callback."""
        body = orjson.dumps(record_view(fields))
        msg_id = webhook_id(fields["id"], fields.get("status", ""))
        now = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"llmworker/{__version__}",
            "webhook-id": msg_id,
            "webhook-timestamp": str(now),
        }
        if self.key is not None:
            headers["webhook-signature"] = sign(self.key, msg_id, now, body)
        return body, headers

    async def deliver(self, fields: dict[str, str]) -> None:
        """One attempt; raises on failure."""
        url = fields.get("callback_url", "")
        try:
            check_callback_url(url, self.settings)  # the settings may have changed since
        except InvalidField as exc:
            raise DeliveryFailed(exc.message, final=True) from None
        body, headers = self.payload(fields)
        with tracing.callback_span(fields, headers):
            await self._send(url, body, headers)

    async def _send(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        if self.settings.callback_via == "qstash":
            await self._publish(url, body, headers)
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    resolver=_PublicOnlyResolver(self.settings.callback_hosts), limit=100
                ),
                timeout=aiohttp.ClientTimeout(total=self.settings.callback_timeout_s),
            )
        try:
            async with self._session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                if 200 <= response.status < 300:
                    return
                text = (await response.content.read(300)).decode("utf-8", "replace").strip()
                raise DeliveryFailed(
                    f"{url} answered {response.status}" + (f": {text}" if text else ""),
                    retry_after_s(response.headers),
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(
                exc.os_error, InternalAddress
            ):
                raise DeliveryFailed(f"{url}: {exc.os_error}", final=True) from exc
            raise DeliveryFailed(
                f"{url} could not be reached: {exc or type(exc).__name__}"
            ) from exc

    async def _publish(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        """Through QStash: it delivers and retries; the webhook id dedupes our retries."""
        from qstash import AsyncQStash

        if self._qstash is None:
            # No retries inside the SDK: each attempt is one publish, cut at
            # CALLBACK_TIMEOUT_S, and retried here.
            self._qstash = AsyncQStash(
                self.settings.qstash_token or "", retry=False, base_url=self.settings.qstash_url
            )
        forward = {
            k: v for k, v in headers.items() if k.startswith("webhook-") or k == "traceparent"
        }
        try:
            await self._qstash.message.publish(
                url=url,
                body=body,
                content_type="application/json",
                headers=forward,
                retries=QSTASH_CALLBACK_RETRIES,
                deduplication_id=headers["webhook-id"],
            )
        except Exception as exc:  # the SDK's errors and httpx's: QStash could not take it
            raise DeliveryFailed(f"QStash did not take the callback: {exc}") from exc
