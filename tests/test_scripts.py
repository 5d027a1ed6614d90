"""The batcher every script call and hot-path write goes through: order, partial replies,
broken and stalled connections, on a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llmworker.connection import connect
from llmworker.keys import Keys
from llmworker.scripts import MAX_BATCH, MAX_INFLIGHT, Scripts


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    r = connect(redis_url)
    yield r
    await r.aclose()


async def test_calls_run_in_the_order_they_were_made_across_batches_in_flight(client, prefix):
    scripts = Scripts(client, Keys(prefix).base)
    key = Keys(prefix).base + "counter"
    n = MAX_BATCH * (MAX_INFLIGHT + 2)
    replies = await asyncio.gather(*(scripts.command("INCR", key) for _ in range(n)))
    assert replies == list(range(1, n + 1))


async def test_a_broken_connection_fails_only_what_it_had_not_answered(client, prefix, redis_url):
    scripts = Scripts(client, Keys(prefix).base)
    own_id = await scripts.command("CLIENT", "ID")
    assert await scripts.command("ECHO", "before") == "before"
    blocked = scripts.command("BLPOP", Keys(prefix).base + "never", 0)
    behind = scripts.command("ECHO", "behind")
    await asyncio.sleep(0.2)  # both are on the wire, waiting behind BLPOP
    other = connect(redis_url)
    await other.client_kill_filter(_id=own_id)
    await other.aclose()
    for future in (blocked, behind):
        with pytest.raises(RedisConnectionError):
            await future
    assert await scripts.command("ECHO", "again") == "again"  # on a new connection


async def test_a_stalled_connection_times_out_and_the_next_calls_get_through(client, prefix):
    scripts = Scripts(client, Keys(prefix).base, timeout_s=0.3)
    stalled = scripts.command("BLPOP", Keys(prefix).base + "never", 0)
    with pytest.raises(RedisTimeoutError, match=r"did not answer within 0\.3 s"):
        await stalled
    assert await scripts.command("ECHO", "next") == "next"


async def test_an_error_reply_fails_its_own_call_only(client, prefix):
    scripts = Scripts(client, Keys(prefix).base)
    key = Keys(prefix).base + "text"
    replies: list[object] = await asyncio.gather(
        scripts.command("SET", key, "x"),
        scripts.command("INCR", key),
        scripts.command("GET", key),
        return_exceptions=True,
    )
    ok, wrong, after = replies
    assert ok == "OK" and after == "x"
    assert "not an integer" in str(wrong)


async def test_a_bad_argument_fails_its_own_call_and_not_its_batch(client, prefix):
    scripts = Scripts(client, Keys(prefix).base)
    key = Keys(prefix).base + "k"
    before = scripts.command("SET", key, "1")
    bad = scripts.command("SET", key, None)
    after = scripts.command("GET", key)
    with pytest.raises(TypeError):
        await bad
    assert (await before, await after) == ("OK", "1")


async def test_calls_that_found_their_script_missing_still_resolve_when_the_link_fails(
    client, prefix, redis_url
):
    scripts = Scripts(client, Keys(prefix).base, timeout_s=0.5)
    assert await scripts.command("PING") == "PONG"  # connected, scripts loaded
    other = connect(redis_url)
    await other.script_flush()
    await other.aclose()
    renew = scripts.call("renew", "replica", 1000)  # NOSCRIPT, to be sent again ...
    stalled = scripts.command("BLPOP", Keys(prefix).base + "never", 0)  # ... behind this
    for future in (renew, stalled):
        with pytest.raises(RedisTimeoutError):
            await asyncio.wait_for(future, 5)
    assert await scripts.call("renew", "replica", 1000) == [[], []]  # nothing lost, none followed


class Proxy:
    """A TCP proxy to Redis that can stop forwarding, as a half-open link does."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    await self.flowing.wait()
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_a_link_that_stops_carrying_writes_fails_its_calls_in_time(redis_url, prefix):
    url = redis.asyncio.Redis.from_url(redis_url).connection_pool.connection_kwargs
    proxy = Proxy(url.get("host", "127.0.0.1"), int(url.get("port", 6379)))
    port = await proxy.start()
    through = connect(f"redis://127.0.0.1:{port}/{url.get('db', 0)}")
    scripts = Scripts(through, Keys(prefix).base, timeout_s=1.0)
    try:
        assert await scripts.command("PING") == "PONG"
        proxy.flowing.clear()  # nothing gets through any more, in either direction
        big = "x" * 20_000
        calls = [scripts.command("SET", Keys(prefix).base + f"k{i}", big) for i in range(400)]
        started = asyncio.get_running_loop().time()
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
        assert all(isinstance(r, RedisTimeoutError) for r in results), results[:3]
        assert asyncio.get_running_loop().time() - started < 5
        proxy.flowing.set()
        assert await scripts.command("PING") == "PONG"  # on a new connection
    finally:
        proxy.flowing.set()
        await through.aclose()
        await proxy.close()
