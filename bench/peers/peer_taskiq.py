"""taskiq with taskiq-redis's ListQueueBroker: asyncio workers;
``python -m taskiq worker peer_taskiq:broker --workers 1 --max-async-tasks N``."""

# Runs in .venv-peers: llmworker's mypy has neither the peer libraries nor this folder.

from __future__ import annotations

import peerlib
from taskiq import Context, TaskiqDepends, TaskiqEvents, TaskiqState
from taskiq_redis import ListQueueBroker

broker = ListQueueBroker(peerlib.REDIS_URL, queue_name="peers")


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def startup(state: TaskiqState) -> None:
    state.http = peerlib.http_session()
    state.redis = peerlib.async_redis()
    await state.redis.incr(peerlib.READY)


@broker.on_event(TaskiqEvents.WORKER_SHUTDOWN)
async def shutdown(state: TaskiqState) -> None:
    await state.http.close()
    await state.redis.aclose()


@broker.task(task_name="llm")
# taskiq injects the context through the default, as its documentation does.
async def llm(i: int, context: Context = TaskiqDepends()) -> str:  # noqa: B008
    return await peerlib.run_async(context.state.http, context.state.redis, i)


async def produce(n: int, clients: int) -> float:
    await broker.startup()
    try:
        return await peerlib.enqueue_async(n, clients, llm.kiq)
    finally:
        await broker.shutdown()
