"""Event readers share the process's Redis connections (hub.py), and a task's events cost
Redis only while somebody follows it (events.py): on real Redis, real HTTP on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from urllib.parse import urlparse

import httpx
import orjson
import psutil
import redis.asyncio as aioredis
from bench.streams import redis_connections

from llmworker.record import TaskSpec

from .conftest import read_events, serve_api, tasks_with, wait_until

CHAT = {"kind": "chat", "input": {"messages": [{"role": "user", "content": "hi"}]}}


def text_of(events: list[tuple[str, str, Any]]) -> str:
    return "".join(data["text"] for _, kind, data in events if kind == "tokens")


async def test_hundreds_of_readers_share_a_constant_number_of_redis_connections(
    make_settings, redis_url
):
    settings = make_settings(
        FAKE_LATENCY_MS=1500, FAKE_TOKENS=30, MAX_FAKE_FREE=40, MAX_USER_FREE=40
    )
    async with serve_api(settings) as (client, _worker):
        ids = [(await client.post("/v1/tasks", json=CHAT)).json()["id"] for _ in range(40)]
        redis_port = urlparse(redis_url).port or 6379
        # One reader first: the hub and the batch have their connections from here on.
        first = asyncio.create_task(read_events(client, ids[0]))
        await asyncio.sleep(0.3)
        before = redis_connections(psutil.Process(), redis_port)
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=str(client.base_url), limits=limits, timeout=30
        ) as many:
            readers = [asyncio.create_task(read_events(many, ids[i % 40])) for i in range(320)]
            await asyncio.sleep(0.8)  # all following, tokens flowing
            during = redis_connections(psutil.Process(), redis_port)
            done = await asyncio.gather(*readers)
        await first
        records = {tid: (await client.get(f"/v1/tasks/{tid}")).json() for tid in ids}
    # Every reader saw its task's whole answer and its record, in order.
    for i, events in enumerate(done):
        record = records[ids[i % 40]]
        assert events[-1][1] == "record" and record["status"] == "succeeded"
        assert text_of(events) == record["result"]["content"]
    assert during <= before + 2, (before, during)


async def test_a_reader_who_comes_mid_answer_gets_the_text_so_far_then_the_rest(make_settings):
    async with serve_api(make_settings(FAKE_LATENCY_MS=1200, FAKE_TOKENS=40)) as (client, worker):
        task = (await client.post("/v1/tasks", json=CHAT)).json()

        async def running() -> bool:
            fields = await worker.queue.get(task["id"])
            return fields is not None and fields["status"] == "running"

        await wait_until(running)
        await asyncio.sleep(0.5)  # about a third of the answer has streamed, unread
        assert not await worker.redis.exists(worker.keys.events(task["id"]))
        events = await read_events(client, task["id"])
    record = events[-1][2]
    assert record["status"] == "succeeded"
    kinds = [kind for _, kind, _ in events]
    assert kinds[0] == "status" and events[0][2] == {"status": "running", "attempts": 1, "run": 1}
    tokens = [data for _, kind, data in events if kind == "tokens"]
    # What streamed before the reader came, as one event; then the rest as it comes.
    assert tokens[0]["n"] >= 8 and len(tokens) >= 3
    assert text_of(events) == record["result"]["content"]
    assert [i for i, _, _ in events[:-1]] == sorted(
        (i for i, _, _ in events[:-1]), key=lambda i: tuple(map(int, i.split("-")))
    )


async def test_a_task_nobody_follows_has_no_event_stream_waiting_or_finished(
    make_settings, start_worker
):
    settings = make_settings(FAKE_LATENCY_MS=20, FAKE_TOKENS=50)
    admitter = await start_worker(settings, dispatch=False)
    task_id, _ = await admitter.admitter.submit(TaskSpec(kind="chat", input=CHAT["input"]))
    assert not await admitter.redis.exists(admitter.keys.events(task_id))
    await start_worker(settings)

    async def finished() -> Any:
        fields = await admitter.queue.get(task_id)
        return fields if fields and fields["status"] == "succeeded" else None

    await wait_until(finished)
    assert not await admitter.redis.exists(admitter.keys.events(task_id))
    assert not await admitter.redis.exists(admitter.keys.followers(task_id))


async def test_a_late_reader_of_a_finished_task_gets_its_record(make_settings):
    async with serve_api(make_settings(FAKE_LATENCY_MS=10)) as (client, worker):
        task = (await client.post("/v1/tasks", json=CHAT)).json()

        async def finished() -> Any:
            fields = await worker.queue.get(task["id"])
            return fields if fields and fields["status"] == "succeeded" else None

        await wait_until(finished)
        events = await read_events(client, task["id"])
    assert [kind for _, kind, _ in events] == ["record"]
    assert events[0][2]["result"]["content"]


async def test_a_reader_on_another_replica_follows_a_task_running_here(make_settings, start_worker):
    settings = make_settings(FAKE_LATENCY_MS=800, FAKE_TOKENS=30)
    runner = await start_worker(settings)
    async with serve_api(settings, dispatch=False) as (client, _api_only):
        task = (await client.post("/v1/tasks", json=CHAT)).json()
        events = await read_events(client, task["id"])
        assert runner.dispatcher.claimed_total == 1
        record = events[-1][2]
        assert text_of(events) == record["result"]["content"] != ""
        # Resumed after its second event, on this replica: the rest, nothing twice.
        rest = await read_events(client, task["id"], after=events[1][0])
    assert [e[0] for e in rest[:-1]] == [e[0] for e in events[2:-1]]


async def test_readers_lose_nothing_when_the_hubs_pubsub_connection_is_cut(
    make_settings, redis_url
):
    settings = make_settings(FAKE_LATENCY_MS=2000, FAKE_TOKENS=60)
    async with serve_api(settings) as (client, _worker):
        task = (await client.post("/v1/tasks", json=CHAT)).json()
        reading = asyncio.create_task(read_events(client, task["id"]))
        await asyncio.sleep(0.6)
        admin = aioredis.Redis.from_url(redis_url)
        try:
            # Every Pub/Sub connection of the deployment's clients: the hub's among them.
            killed = await admin.client_kill_filter(_type="pubsub")
        finally:
            await admin.aclose()
        assert killed >= 1
        events = await asyncio.wait_for(reading, 20)
    record = events[-1][2]
    assert record["status"] == "succeeded"
    assert text_of(events) == record["result"]["content"]


async def test_a_reader_leaving_stops_the_task_writing_for_it(make_settings):
    async with serve_api(make_settings(FAKE_LATENCY_MS=3000, FAKE_TOKENS=30)) as (client, worker):
        task = (await client.post("/v1/tasks", json=CHAT)).json()
        followers = worker.keys.followers(task["id"])

        async def named() -> Any:
            return await worker.redis.smembers(followers) == {worker.replica_id}  # type: ignore[misc]

        reading = asyncio.create_task(read_events(client, task["id"]))
        await wait_until(named, 5)
        reading.cancel()  # the reader hangs up
        with contextlib.suppress(asyncio.CancelledError):
            await reading

        async def unnamed() -> bool:
            return not worker.hub.readers and await worker.redis.scard(followers) == 0  # type: ignore[misc]

        # The replica's name leaves the task's followers with its last reader.
        await wait_until(unnamed, 5)


async def test_an_answer_nobody_follows_costs_a_few_commands_whatever_its_length(
    make_settings, start_worker, redis_url
):
    from bench.footprint import CommandCounter

    url = urlparse(redis_url)
    counter = CommandCounter(url.hostname or "127.0.0.1", url.port or 6379)
    port = await counter.start()
    direct = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        # The replicas talk to Redis through the counter; the test looks on directly.
        settings = make_settings(
            REDIS_URL=f"redis://127.0.0.1:{port}{url.path}",
            FAKE_LATENCY_MS=0,
            FAKE_TOKENS=400,
            MAX_FAKE_FREE=50,
        )
        admitter = await start_worker(settings, dispatch=False)
        ids = [
            (await admitter.admitter.submit(TaskSpec(kind="chat", input=CHAT["input"])))[0]
            for _ in range(50)
        ]
        before = counter.commands
        await start_worker(settings)

        async def finished() -> bool:
            statuses = [await direct.hget(admitter.keys.task(i), "status") for i in ids]  # type: ignore[misc]
            return all(status == "succeeded" for status in statuses)

        await wait_until(finished)
        per_task = (counter.commands - before) / len(ids)
        results = [await direct.hget(admitter.keys.task(i), "result") for i in ids]  # type: ignore[misc]
    finally:
        await direct.aclose()
        await counter.stop()
    assert all(len(orjson.loads(r)["content"]) > 1000 for r in results)
    # A finish each, a share of the batched claims and the replica's heartbeats; no
    # events (a streamed one would cost 80 here).
    assert per_task <= 5, per_task


async def test_a_quiet_stream_gets_keep_alives_and_the_hub_renews_its_name(
    make_settings, monkeypatch
):
    from llmworker import hub

    monkeypatch.setattr(hub, "TICK_S", 0.2)
    async with serve_api(make_settings(), dispatch=False) as (client, worker):
        task = (await client.post("/v1/tasks", json=CHAT)).json()
        followers = worker.keys.followers(task["id"])
        pings = 0
        async with client.stream("GET", f"/v1/tasks/{task['id']}/events") as r:
            async for line in r.aiter_lines():
                if line.startswith(": ping"):
                    pings += 1
                    if pings == 1:
                        # Shorten the name's life: the next tick must renew it.
                        await worker.redis.pexpire(followers, 300)
                    if pings == 6:
                        ttl = await worker.redis.pttl(followers)
                        break
        heard = worker.hub._heard
        subscriptions = worker.hub.subscriptions
    # Six keep-alives of a task still queued; the name was renewed; the Pub/Sub link
    # answered the ticks' PINGs and was never made again.
    assert pings == 6
    assert ttl > 1000
    assert heard >= 4 and subscriptions == 1


async def test_a_follow_notice_the_runner_missed_is_heard_at_its_next_renewal(
    make_settings, start_worker, redis_url
):
    settings = make_settings(FAKE_LATENCY_MS=3000, FAKE_TOKENS=40)
    runner = await start_worker(settings)
    db = urlparse(redis_url).path.strip("/") or "0"
    async with serve_api(settings, dispatch=False) as (client, _api_only):
        task = (await client.post("/v1/tasks", json=CHAT)).json()
        await wait_until(lambda: task["id"] in runner.dispatcher.runs)
        await asyncio.sleep(0.3)
        admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            # The runner's dispatcher link (wake, cancel, follow): the only one with three
            # channels. A reader follows while it reconnects.
            links = [c for c in await admin.client_list() if c["db"] == db and c["sub"] == "3"]
            assert len(links) == 1
            await admin.client_kill_filter(_id=links[0]["id"])
        finally:
            await admin.aclose()
        events = await read_events(client, task["id"])
    record = events[-1][2]
    assert text_of(events) == record["result"]["content"]


async def test_a_reader_who_follows_as_the_run_starts_gets_its_whole_text(make_settings):
    # Readers follow as their tasks are claimed; whichever comes first, the claim's reply
    # or the follow notice, each reader gets the whole answer.
    settings = make_settings(FAKE_LATENCY_MS=400, FAKE_TOKENS=20, MAX_FAKE_FREE=60)
    async with serve_api(settings) as (client, _worker):
        ids = [(await client.post("/v1/tasks", json=CHAT)).json()["id"] for _ in range(60)]
        done = await asyncio.gather(*(read_events(client, i) for i in ids))
    for events in done:
        assert text_of(events) == events[-1][2]["result"]["content"]
        assert [k for _, k, d in events if k == "status" and d["status"] == "running"] == ["status"]


async def test_a_run_streaming_always_writes_one_running_status_and_its_stream_expires(
    make_settings,
):
    async def slow_start(ctx: Any, input: Any) -> str:
        await asyncio.sleep(0.5)
        for word in ("a", "b", "c"):
            ctx.events.token(word)
        await asyncio.sleep(10)  # cancelled here, its batch not yet written
        return "abc"

    settings = make_settings(
        TOKEN_EVENTS="always", TOKEN_FLUSH_MS=300, MAX_FAKE_FREE=5, MAX_USER_FREE=5
    )
    tasks = tasks_with(("slow", slow_start))
    async with serve_api(settings, tasks=tasks) as (client, worker):
        followed = (await client.post("/v1/tasks", json={"kind": "slow"})).json()
        reading = asyncio.create_task(read_events(client, followed["id"]))
        unfollowed = (await client.post("/v1/tasks", json={"kind": "slow"})).json()
        await asyncio.sleep(0.7)
        for task in (followed, unfollowed):
            assert (await client.delete(f"/v1/tasks/{task['id']}")).status_code == 200
        events = await reading
        await wait_until(lambda: not worker.dispatcher.runs, 5)
        await asyncio.sleep(0.4)  # the last batch goes out after the cancel
        ttls = [await worker.redis.ttl(worker.keys.events(t["id"])) for t in (followed, unfollowed)]
    statuses = [d["status"] for _, k, d in events if k == "status"]
    assert statuses == ["running", "cancelled"]
    # Written after its task ended, a stream lives as long as any finished task's events.
    assert all(0 < ttl <= 600 for ttl in ttls), ttls
