"""Test fixtures: a real Redis (the machine's, or an embedded one), a fresh key prefix
per test, real HTTP servers on loopback for the API and the fake provider."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import uvicorn

from llmworker.client import _Stream
from llmworker.embedded import redis_server_binary
from llmworker.fakellm import FakeConfig, FakeLLM
from llmworker.handlers import Registry
from llmworker.handlers import registry as builtin_registry
from llmworker.keys import Keys
from llmworker.settings import Settings, load_settings
from llmworker.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
# A Standard Webhooks secret for tests that send callbacks.
CALLBACK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """LLMWORKER_TEST_REDIS_URL, else the Redis on 127.0.0.1:6379, else one started here."""
    url = os.environ.get("LLMWORKER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    if _answers(url):
        yield url
        return
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                tmp,
            ],
            stdout=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while not _answers(url):
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("could not start a Redis for the tests")
            time.sleep(0.05)
        try:
            yield url
        finally:
            proc.terminate()
            proc.wait()


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test alone; its keys are deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=Keys(name).pattern, count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def make_settings(redis_url: str, prefix: str) -> Callable[..., Settings]:
    def build(**env: Any) -> Settings:
        environ = {"REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "LOG_LEVEL": "WARNING"}
        environ.update({k.upper(): str(v) for k, v in env.items()})
        return load_settings(environ, env_file=None)

    return build


def tasks_with(*handlers: Any) -> Registry:
    """A registry with the built-in kinds plus the given ``(name, fn)`` handlers."""
    tasks = Registry()
    for name in builtin_registry.names:
        handler = builtin_registry.get(name)
        assert handler is not None
        tasks.add(handler)
    for name, fn in handlers:
        tasks.task(name)(fn)
    return tasks


@pytest.fixture
async def start_worker() -> AsyncIterator[Callable[..., Any]]:
    """Start workers (replicas) in this event loop; all are stopped after the test."""
    started: list[Worker] = []

    async def start(
        settings: Settings, tasks: Registry | None = None, dispatch: bool = True
    ) -> Worker:
        worker = Worker(settings, tasks=tasks, dispatch=dispatch)
        await worker.start()
        started.append(worker)
        return worker

    yield start
    for worker in reversed(started):
        if worker.started:
            await worker.stop()


class LoopbackServer:
    """An ASGI app served by uvicorn on 127.0.0.1 in this event loop (with ``http``, the
    protocol class ``serve`` uses)."""

    def __init__(self, app: Any, port: int = 0, http: Any = "auto") -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", http=http
            )
        )
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> str:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                await self.task
                raise RuntimeError("server did not start")
            await asyncio.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task


@contextlib.asynccontextmanager
async def serve_api(
    settings: Settings, port: int = 0, **worker_kwargs: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Worker]]:
    """A worker and its HTTP API on loopback, and a client for it."""
    from llmworker.api import create_app
    from llmworker.protocol import BoundedHttpProtocol

    BoundedHttpProtocol.configure(settings)
    worker = Worker(settings, **worker_kwargs)
    async with (
        LoopbackServer(create_app(settings, worker), port, BoundedHttpProtocol) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        yield client, worker


@pytest.fixture
async def fake_llm() -> AsyncIterator[tuple[str, FakeLLM]]:
    """The fake provider on loopback: (its /v1 base URL, the object, to read its counters)."""
    fake = FakeLLM(FakeConfig(latency_ms=50, tokens=5, retry_after_s=0.05))
    async with LoopbackServer(fake.app()) as url:
        yield f"{url}/v1", fake


@pytest.fixture
async def http() -> AsyncIterator[Callable[[str], httpx.AsyncClient]]:
    clients: list[httpx.AsyncClient] = []

    def make(base_url: str, **kwargs: Any) -> httpx.AsyncClient:
        client = httpx.AsyncClient(base_url=base_url, timeout=30, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


async def read_events(
    client: httpx.AsyncClient, task_id: str, after: str | None = None
) -> list[tuple[str, str, Any]]:
    """Every event of one SSE response, parsed as llmworker's client parses them (no
    resuming): (id, type, data); the record's id is ""."""
    parser = _Stream(after, 0)
    events: list[tuple[str, str, Any]] = []
    async with client.stream("GET", f"/v1/tasks/{task_id}/events", headers=parser.headers) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if (event := parser.feed(line)) is not None:
                events.append((event.id or "", event.type, event.data))
    return events


async def wait_until(
    predicate: Callable[[], Any], timeout_s: float = 10.0, every_s: float = 0.02
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(every_s)


def installed(tool: str, package: str) -> str:
    """A program ``.ci/run`` installs: missing under CI is a failure, elsewhere a skip."""
    found = shutil.which(tool)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed (.ci/run installs Debian's {package} package)")
        pytest.skip(f"{tool} is not installed (apt-get install {package})")
    return found


def worker_env(redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    """The environment of a worker process of this test: its Redis, its key prefix."""
    return {"REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "LOG_LEVEL": "WARNING", **extra}


def llmworker_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmworker", *args]


@contextlib.contextmanager
def process(
    args: list[str], env: dict[str, str], log_path: Path, cwd: Path = ROOT
) -> Iterator[subprocess.Popen[bytes]]:
    """A child process, stopped with SIGTERM (then SIGKILL) at the end."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            args, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=cwd
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
