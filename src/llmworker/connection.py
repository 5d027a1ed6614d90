"""Redis clients: how every part of llmworker connects, and the bounded wait at start-up."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from llmworker.errors import StartupError
from llmworker.settings import redacted_url

log = structlog.get_logger("llmworker.connection")

# While Redis does not answer at start-up, one line this often, not one per attempt.
REPORT_EVERY_S = 5.0


def connect(url: str, retries: int | None = None) -> Redis:
    """A client for ``url``. ``retries=0``: errors reach the caller at once, for loops
    that must know when their connection was lost (Pub/Sub)."""
    options: dict[str, Any] = {"decode_responses": True, "health_check_interval": 30}
    if not url.startswith("unix://"):
        # Notice a Redis that vanished behind a NAT or load balancer.
        options["socket_keepalive"] = True
    if retries is not None:
        options["retry"] = Retry(NoBackoff(), retries)
    return Redis.from_url(url, **options)


async def wait_for_redis(redis: Redis, url: str, timeout_s: float) -> None:
    """A bounded wait for Redis at start-up (it may still be booting beside us): a line
    naming REDIS_URL every few seconds, then :class:`StartupError` after ``timeout_s``
    (REDIS_CONNECT_TIMEOUT_S)."""
    started = time.monotonic()
    reported = started
    delay = 0.1
    while True:
        try:
            await redis.ping()  # type: ignore[misc]
            return
        except (RedisError, OSError) as exc:
            now = time.monotonic()
            if now - started >= timeout_s:
                raise StartupError(
                    f"Redis at REDIS_URL={redacted_url(url)} did not answer within "
                    f"{timeout_s:g} s (REDIS_CONNECT_TIMEOUT_S): {exc}"
                ) from None
            if now - reported >= REPORT_EVERY_S or reported == started:
                reported = now
                log.warning(
                    "redis_waiting",
                    redis_url=redacted_url(url),
                    error=str(exc),
                    waited_s=round(now - started, 1),
                    gives_up_after_s=timeout_s,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def check_redis(url: str, timeout_s: float) -> None:
    """:func:`wait_for_redis` on a client of its own (``serve``, before it listens)."""
    redis = connect(url)
    try:
        await wait_for_redis(redis, url, timeout_s)
    finally:
        await redis.aclose()
