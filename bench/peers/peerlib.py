"""What every peer's task does, whatever queue runs it: one streamed chat completion
against the benchmark's fake provider, read to its end, then its text and the time it
finished recorded in Redis. The driver (bench/peers.py) reads those records: each peer is
timed by its own workers, not by polling it.

These modules run in .venv-peers with the peer libraries, never in llmworker's venv.
The driver passes everything through the environment (PEERS_*)."""

# Runs in .venv-peers: llmworker's mypy has neither the peer libraries nor this folder.

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import httpx
import orjson
import redis
import redis.asyncio

REDIS_URL = os.environ.get("PEERS_REDIS_URL", "redis://127.0.0.1:6379/15")
LLM_URL = os.environ.get("PEERS_LLM_URL", "http://127.0.0.1:8000/v1/chat/completions")
CONCURRENCY = int(os.environ.get("PEERS_CONCURRENCY", "10"))
# The request llmworker sends for the same task: the driver's CHAT_INPUT, model m1.
BODY = orjson.dumps(
    {
        "model": os.environ.get("PEERS_MODEL", "m1"),
        "messages": orjson.loads(os.environ.get("PEERS_MESSAGES", "[]")),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
)
HEADERS = {"Content-Type": "application/json"}

# The driver's keys (the peers' own keys live beside them in the same database).
DONE = "peers:done"  # task index -> [finish time, text]
ERRORS = "peers:errors"  # exception name -> count (a task may be retried by its peer)
READY = "peers:ready"  # worker processes ready to consume


def content(line: bytes) -> str:
    """The text one SSE line adds to the answer."""
    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
        return ""
    chunk = orjson.loads(line[6:])
    choices = chunk.get("choices") or []
    return "".join(c.get("delta", {}).get("content") or "" for c in choices[:1])


def done_record(text: str) -> bytes:
    return orjson.dumps([time.time(), text])


# -- async peers (saq, taskiq, arq): aiohttp and redis.asyncio, one of each per process


def http_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


def async_redis() -> redis.asyncio.Redis:
    return redis.asyncio.Redis.from_url(REDIS_URL)


async def chat_async(session: aiohttp.ClientSession) -> str:
    parts: list[str] = []
    async with session.post(LLM_URL, data=BODY, headers=HEADERS) as response:
        response.raise_for_status()
        async for line in response.content:
            parts.append(content(line))
    return "".join(parts)


async def run_async(session: aiohttp.ClientSession, client: redis.asyncio.Redis, i: int) -> str:
    try:
        text = await chat_async(session)
    except Exception as exc:
        await client.hincrby(ERRORS, type(exc).__name__, 1)
        raise
    await client.hset(DONE, str(i), done_record(text))
    return text


async def enqueue_async(n: int, clients: int, enqueue: Callable[[int], Awaitable[Any]]) -> float:
    """``enqueue(i)`` for every task from ``clients`` concurrent enqueuers; when the first
    enqueue began (epoch seconds)."""
    indices = iter(range(n))

    async def one_client() -> None:
        for i in indices:
            await enqueue(i)

    started = time.time()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    return started


# -- thread peers (dramatiq, celery): httpx and redis clients shared by a process's threads

_lock = threading.Lock()
_sync: dict[str, Any] = {}


def _shared() -> tuple[httpx.Client, redis.Redis]:
    # Made on first use, in the process that runs tasks: never across a fork.
    with _lock:
        if not _sync:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=CONCURRENCY * 2)
            _sync["http"] = httpx.Client(limits=limits, timeout=60)
            _sync["redis"] = redis.Redis.from_url(REDIS_URL)
    return _sync["http"], _sync["redis"]


def chat_sync(client: httpx.Client) -> str:
    parts: list[str] = []
    with client.stream("POST", LLM_URL, content=BODY, headers=HEADERS) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            parts.append(content(line.encode()))
    return "".join(parts)


def run_sync(i: int) -> str:
    http, client = _shared()
    try:
        text = chat_sync(http)
    except Exception as exc:
        client.hincrby(ERRORS, type(exc).__name__, 1)
        raise
    client.hset(DONE, str(i), done_record(text))
    return text


def ready_sync() -> None:
    redis.Redis.from_url(REDIS_URL).incr(READY)


def enqueue_threads(n: int, clients: int, enqueue: Callable[[int], Any]) -> float:
    """``enqueue(i)`` for every task from ``clients`` threads; when the first began."""
    indices = iter(range(n))
    lock = threading.Lock()
    go = threading.Event()

    def one_client() -> None:
        go.wait()
        while True:
            with lock:
                i = next(indices, None)
            if i is None:
                return
            enqueue(i)

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(one_client) for _ in range(clients)]
        started = time.time()
        go.set()
        for future in futures:
            future.result()
    return started
