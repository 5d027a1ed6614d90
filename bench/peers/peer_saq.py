"""saq: asyncio workers; ``python -m saq peer_saq.settings``, one process of
``concurrency`` jobs."""

# Runs in .venv-peers: llmworker's mypy has neither the peer libraries nor this folder.

from __future__ import annotations

from typing import Any

import peerlib
from saq import Queue

QUEUE = "peers"


async def startup(ctx: dict[str, Any]) -> None:
    ctx["http"] = peerlib.http_session()
    ctx["redis"] = peerlib.async_redis()
    await ctx["redis"].incr(peerlib.READY)


async def shutdown(ctx: dict[str, Any]) -> None:
    await ctx["http"].close()
    await ctx["redis"].aclose()


async def llm(ctx: dict[str, Any], *, i: int) -> str:
    return await peerlib.run_async(ctx["http"], ctx["redis"], i)


settings = {
    "queue": Queue.from_url(peerlib.REDIS_URL, name=QUEUE),
    "functions": [llm],
    "concurrency": peerlib.CONCURRENCY,
    "startup": startup,
    "shutdown": shutdown,
}


async def produce(n: int, clients: int) -> float:
    queue = Queue.from_url(peerlib.REDIS_URL, name=QUEUE)
    await queue.connect()
    try:
        return await peerlib.enqueue_async(n, clients, lambda i: queue.enqueue("llm", i=i))
    finally:
        await queue.disconnect()
