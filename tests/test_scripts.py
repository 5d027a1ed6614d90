"""The batcher every script call and hot-path write goes through: order, partial replies,
broken and stalled connections, on a real Redis."""

from __future__ import annotations

import asyncio
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
