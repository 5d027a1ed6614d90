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

log = structlog.get_logger("llmworker.connection")


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


async def wait_for_redis(redis: Redis, timeout_s: float) -> None:
    """A bounded wait for Redis at start-up (it may still be booting beside us)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while True:
        try:
            await redis.ping()  # type: ignore[misc]
            return
        except (RedisError, OSError) as exc:
            if time.monotonic() >= deadline:
                raise RedisError(f"Redis did not answer within {timeout_s:g} s: {exc}") from exc
            log.warning("redis_waiting", error=str(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
