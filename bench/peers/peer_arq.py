"""arq: asyncio workers; ``python -m arq peer_arq.WorkerSettings``, one process of
``max_jobs`` jobs."""

# Runs in .venv-peers: llmworker's mypy has neither the peer libraries nor this folder.

from __future__ import annotations

import os
from typing import Any

import peerlib
from arq import create_pool
from arq.connections import RedisSettings

REDIS = RedisSettings.from_dsn(peerlib.REDIS_URL)


async def startup(ctx: dict[str, Any]) -> None:
    ctx["http"] = peerlib.http_session()
    await ctx["redis"].incr(peerlib.READY)


async def shutdown(ctx: dict[str, Any]) -> None:
    await ctx["http"].close()


async def llm(ctx: dict[str, Any], i: int) -> str:
    return await peerlib.run_async(ctx["http"], ctx["redis"], i)


class WorkerSettings:
    functions = [llm]
    redis_settings = REDIS
    max_jobs = peerlib.CONCURRENCY
    on_startup = startup
    on_shutdown = shutdown
    # arq looks for new jobs every poll_delay (0.5 s by default); the driver may set it.
    poll_delay = float(os.environ.get("PEERS_ARQ_POLL_DELAY", "0.5"))


async def produce(n: int, clients: int) -> float:
    pool = await create_pool(REDIS)
    try:
        return await peerlib.enqueue_async(n, clients, lambda i: pool.enqueue_job("llm", i))
    finally:
        await pool.aclose()
