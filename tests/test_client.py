"""llmworker.client: the producer helpers, sync and async, against a worker on loopback."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from llmworker.client import ApiError, AsyncClient, Client, WorkerUnreachable
from llmworker.qstashdev import QStashDev

from .conftest import LoopbackServer, free_port, serve_api, wait_until

MESSAGES = [{"role": "user", "content": "tell me about bees"}]


async def test_async_client_runs_a_task_and_follows_its_events_in_order(make_settings):
    async with (
        serve_api(make_settings(FAKE_LATENCY_MS=30, FAKE_TOKENS=12)) as (http, _),
        AsyncClient(str(http.base_url)) as client,
    ):
        task = await client.submit("chat", {"messages": MESSAGES}, user="u1", tier="paid")
        events = [e async for e in client.events(task["id"])]
    types = [e.type for e in events]
    assert types[-1] == "record" and events[-1].data["status"] == "succeeded"
    statuses = [e.data["status"] for e in events if e.type == "status"]
    # The first event is the task's status when the reader came (it may have started).
    assert statuses in (["queued", "running", "succeeded"], ["running", "succeeded"])
    # The text that streamed before the reader came arrives first, then the rest.
    text = "".join(e.data["text"] for e in events if e.type == "tokens")
    assert text == events[-1].data["result"]["content"]
    assert types.index("tokens") > types.index("status")
    ids = [e.id for e in events if e.id]
    assert ids == sorted(ids, key=lambda i: tuple(int(p) for p in i.split("-")))


async def test_events_resume_after_the_last_event_seen(make_settings):
    async with (
        serve_api(make_settings(FAKE_LATENCY_MS=10, FAKE_TOKENS=12)) as (http, _),
        AsyncClient(str(http.base_url)) as client,
    ):
        task = await client.submit("chat", {"messages": MESSAGES})
        everything = [e async for e in client.events(task["id"])]
        middle = everything[2].id
        rest = [e async for e in client.events(task["id"], last_event_id=middle)]
    assert [e.id for e in rest] == [e.id for e in everything[3:]]


async def test_sync_client_submits_waits_and_reports_refusals(make_settings):
    settings = make_settings(FAKE_LATENCY_MS=10, QUEUE_MAX_FREE=1, QUEUE_FULL_RETRY_AFTER_S=3)
    async with serve_api(settings, dispatch=False) as (http, worker):

        def produce() -> tuple[dict[str, Any], ApiError, ApiError]:
            with Client(str(http.base_url)) as client:
                queued = client.submit("chat", {"messages": MESSAGES})
                with pytest.raises(ApiError) as full:
                    client.submit("chat", {"messages": MESSAGES})
                with pytest.raises(ApiError) as invalid:
                    client.submit("chat", {"messages": "not a list"})
                return queued, full.value, invalid.value

        queued, full, invalid = await asyncio.to_thread(produce)
        assert queued["status"] == "queued"
        assert (full.status, full.code, full.retry_after_s) == (429, "queue_full", 3.0)
        assert (invalid.status, invalid.code) == (422, "invalid_field")
        assert invalid.body["field"] == "input.messages"

        worker.dispatcher.start()
        with Client(str(http.base_url)) as client:
            record = await asyncio.to_thread(client.wait, queued["id"], 10)
        assert record["status"] == "succeeded"


async def test_any_replica_serves_the_events_of_a_task_another_one_runs(
    make_settings, start_worker
):
    settings = make_settings(FAKE_LATENCY_MS=40, FAKE_TOKENS=8)
    runner = await start_worker(settings)
    async with (
        serve_api(settings, dispatch=False) as (http, edge),
        AsyncClient(str(http.base_url)) as client,
    ):
        task = await client.submit("chat", {"messages": MESSAGES})
        events = [e async for e in client.events(task["id"])]
    assert events[-1].data["status"] == "succeeded"
    assert any(e.type == "tokens" for e in events)
    assert runner.dispatcher.claimed_total == 1 and edge.dispatcher.claimed_total == 0


async def test_publishing_through_qstash_reaches_the_worker(make_settings):
    current, nxt = (
        "sig_client_c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0",
        "sig_client_n1n1n1n1n1n1n1n1n1n1n1n1n1n1n1",
    )
    dev = QStashDev("tok", current, nxt, retry_scale=0.001)
    port = free_port()
    async with LoopbackServer(dev.app()) as dev_url:
        env = {
            "QSTASH_CURRENT_SIGNING_KEY": current,
            "QSTASH_NEXT_SIGNING_KEY": nxt,
            "PUBLIC_URL": f"http://127.0.0.1:{port}",
            "FAKE_LATENCY_MS": 5,
        }
        async with (
            serve_api(make_settings(**env), port) as (http, _),
            AsyncClient(str(http.base_url)) as client,
        ):
            message_id = await client.publish(
                    "chat", {"messages": MESSAGES}, user="u7",
                    qstash_token="tok", qstash_url=dev_url,
                )  # fmt: skip

            def publish_sync() -> str:
                with Client(str(http.base_url)) as sync:
                    return sync.publish(
                        "chat", {"messages": MESSAGES}, qstash_token="tok", qstash_url=dev_url
                    )

            other_id = await asyncio.to_thread(publish_sync)
            delivered = {message_id, other_id}
            await wait_until(
                lambda: all(dev.messages[m].state == "DELIVERED" for m in delivered) or None
            )
    assert [r["status"] for r in dev.messages[message_id].responses] == [202]
    assert '"user":"u7"' in dev.messages[message_id].responses[0]["body"]


async def test_a_published_task_is_found_by_its_message_id_and_errors_carry_the_message(
    make_settings,
):
    async with (
        serve_api(make_settings(), dispatch=False) as (http, _),
        AsyncClient(str(http.base_url)) as client,
    ):
        task = await client.submit("chat", {"messages": MESSAGES}, idempotency_key="msg_42")
        assert (await client.find("msg_42"))["id"] == task["id"]
        with pytest.raises(ApiError) as missing:
            await client.find("msg_unknown")
        assert missing.value.status == 404 and missing.value.message.startswith("No task")
        assert str(missing.value).startswith("404 not_found: No task")
        r = await http.get("/v1/tasks")
        assert r.status_code == 400 and "idempotency_key" in r.json()["message"]


async def test_following_events_gives_up_when_the_worker_stays_unreachable():
    url = f"http://127.0.0.1:{free_port()}"
    async with AsyncClient(url, reconnects=1) as client:
        with pytest.raises(WorkerUnreachable, match="is `llmworker serve` running"):
            async for _ in client.events("01ABC"):
                pass
        with pytest.raises(WorkerUnreachable) as caught:
            await client.get("01ABC")
        assert caught.value.url == url
    with Client(url) as sync, pytest.raises(WorkerUnreachable):
        sync.submit("chat", {"messages": []})
