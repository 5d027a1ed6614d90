"""End to end through QStash: the official ``qstash`` SDK publishes to ``llmworker
qstash-dev``, which signs and delivers to the worker's /v1/qstash, retrying as QStash
does; callbacks can go back out through it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from qstash import AsyncQStash
from standardwebhooks import Webhook

from llmworker import signature
from llmworker.qstashdev import Message, QStashDev, backoff_s

from .conftest import CALLBACK_SECRET, LoopbackServer, free_port, serve_api, wait_until
from .test_notify import Receiver

TOKEN = "dev-token-1"
CURRENT, NEXT = "sig_dev_5c0ffee5c0ffee5c0ffee5c0ffee5c0", "sig_dev_7beef7beef7beef7beef7beef7be"
CHAT = {"kind": "chat", "input": {"messages": [{"role": "user", "content": "hi"}]}}


@contextlib.asynccontextmanager
async def qstash_and_worker(
    make_settings: Any, dispatch: bool = True, **env: Any
) -> AsyncIterator[tuple[AsyncQStash, QStashDev, httpx.AsyncClient, Any, str]]:
    """qstash-dev and a worker that trusts its keys, and the SDK's client for qstash-dev."""
    dev = QStashDev(TOKEN, CURRENT, NEXT, retry_scale=0.001)
    port = free_port()
    public_url = f"http://127.0.0.1:{port}"
    async with LoopbackServer(dev.app()) as dev_url:
        settings = make_settings(
            QSTASH_CURRENT_SIGNING_KEY=CURRENT,
            QSTASH_NEXT_SIGNING_KEY=NEXT,
            QSTASH_URL=dev_url,
            QSTASH_TOKEN=TOKEN,
            PUBLIC_URL=public_url,
            FAKE_LATENCY_MS=5,
            **env,
        )
        async with serve_api(settings, port, dispatch=dispatch) as (client, worker):
            yield AsyncQStash(TOKEN, base_url=dev_url), dev, client, worker, public_url


def answered(message: Message) -> dict[str, Any]:
    """The worker's answer to the message's last delivery."""
    return dict(orjson.loads(message.responses[-1]["body"]))


async def test_a_message_published_with_the_official_sdk_becomes_a_task_that_runs(
    make_settings,
):
    async with qstash_and_worker(make_settings) as (qstash, dev, client, _, url):
        sent = await qstash.message.publish_json(url=f"{url}/v1/qstash", body=CHAT)
        message = dev.messages[sent.message_id]  # type: ignore[union-attr]
        await wait_until(lambda: message.state == "DELIVERED" or None)
        assert message.responses[0]["status"] == 202
        task_id = answered(message)["id"]

        async def done() -> dict[str, Any] | None:
            record = (await client.get(f"/v1/tasks/{task_id}")).json()
            return record if record["status"] == "succeeded" else None

        record = await wait_until(done)
        assert record["idempotency_key"] == message.id
        assert record["qstash"] == {"message_id": message.id, "retried": 0}


async def test_deduplicated_and_redelivered_messages_make_one_task(make_settings):
    async with qstash_and_worker(make_settings, dispatch=False) as (qstash, dev, _, worker, url):
        first = await qstash.message.publish_json(
            url=f"{url}/v1/qstash", body=CHAT, deduplication_id="order-1"
        )
        again = await qstash.message.publish_json(
            url=f"{url}/v1/qstash", body=CHAT, deduplication_id="order-1"
        )
        assert again.deduplicated and again.message_id == first.message_id  # type: ignore[union-attr]
        message = dev.messages[first.message_id]  # type: ignore[union-attr]
        await wait_until(lambda: message.state == "DELIVERED" or None)
        # QStash delivers at least once: the same message again is the same task.
        status, _, body, _ = await dev._attempt(message)
        assert status == 200 and orjson.loads(body)["id"] == answered(message)["id"]
        assert sum((await worker.queue.depths()).values()) == 2  # tier + tier|model


async def test_a_full_queue_is_retried_after_retry_after_and_then_admitted(make_settings):
    env = {"QUEUE_MAX_FREE": 1, "QUEUE_FULL_RETRY_AFTER_S": 1}
    async with qstash_and_worker(make_settings, dispatch=False, **env) as (qs, dev, _, w, url):
        first = await qs.message.publish_json(url=f"{url}/v1/qstash", body=CHAT)
        one = dev.messages[first.message_id]  # type: ignore[union-attr]
        await wait_until(lambda: one.state == "DELIVERED" or None)
        second = await qs.message.publish_json(url=f"{url}/v1/qstash", body=CHAT)
        two = dev.messages[second.message_id]  # type: ignore[union-attr]
        await wait_until(lambda: two.state == "RETRY" or None)
        assert two.responses[0]["status"] == 429
        await w.queue.cancel(answered(one)["id"], 60)  # room in the queue again
        await wait_until(lambda: two.state == "DELIVERED" or None, timeout_s=5)
        assert [r["status"] for r in two.responses] == [429, 202]


async def test_an_invalid_task_goes_to_the_dead_letter_queue_without_retries(make_settings):
    async with qstash_and_worker(make_settings, dispatch=False) as (qstash, dev, _, _w, url):
        sent = await qstash.message.publish_json(url=f"{url}/v1/qstash", body={"kind": "nope"})
        message = dev.messages[sent.message_id]  # type: ignore[union-attr]
        await wait_until(lambda: message.state == "FAILED" or None)
        assert [r["status"] for r in message.responses] == [489]
        dlq = await qstash.dlq.list()
        assert [(m.message_id, m.response_status) for m in dlq.messages] == [(message.id, 489)]


async def test_qstash_dev_retries_on_qstashs_schedule_and_gives_up_after_the_retries(
    make_settings,
):
    receiver = Receiver(answers=[(500, {})] * 10)
    async with LoopbackServer(receiver) as url:
        dev = QStashDev(TOKEN, CURRENT, NEXT, retry_scale=0.0001)
        async with LoopbackServer(dev.app()) as dev_url:
            qstash = AsyncQStash(TOKEN, base_url=dev_url)
            sent = await qstash.message.publish(url=f"{url}/hook", body="x", retries=2)
            message = dev.messages[sent.message_id]  # type: ignore[union-attr]
            await wait_until(lambda: message.state == "FAILED" or None)
    assert [h["upstash-retried"] for h, _ in receiver.received] == ["0", "1", "2"]
    for headers, body in receiver.received:
        signature.verify(headers["upstash-signature"], body, f"{url}/hook", [CURRENT], leeway_s=5)
    assert round(backoff_s(1)) == 12 and round(backoff_s(2)) == 148 and round(backoff_s(3)) == 1808


async def test_callbacks_can_be_published_through_qstash(make_settings):
    receiver = Receiver()
    async with LoopbackServer(receiver) as hook_url:
        env: dict[str, Any] = {
            "CALLBACK_VIA": "qstash",
            "CALLBACK_SECRET": CALLBACK_SECRET,
            "CALLBACK_ALLOWED_HOSTS": "127.0.0.1",
        }
        async with qstash_and_worker(make_settings, **env) as (qstash, dev, _, _w, url):
            body = {**CHAT, "callback_url": f"{hook_url}/done"}
            await qstash.message.publish_json(url=f"{url}/v1/qstash", body=body)
            await wait_until(lambda: receiver.received or None)
    headers, payload = receiver.received[0]
    # QStash signed the delivery; the webhook headers came along, so receivers verify either.
    signature.verify(
        headers["upstash-signature"], payload, f"{hook_url}/done", [CURRENT], leeway_s=5
    )
    record = Webhook(CALLBACK_SECRET).verify(payload, headers)
    assert record["status"] == "succeeded"
    assert any(m.destination == f"{hook_url}/done" for m in dev.messages.values())


def test_delays_are_read_as_qstash_writes_them():
    from llmworker.qstashdev import _duration_s

    assert [_duration_s(d) for d in ("90", "30s", "5m", "1h30m", "1d")] == [
        90,
        30,
        300,
        5400,
        86400,
    ]
    for bad in ("soon", "5x", "1h 30m", ""):
        with pytest.raises(ValueError):
            _duration_s(bad)


async def test_destinations_raw_or_encoded_reach_the_same_url_and_bad_ones_dead_letter():
    receiver = Receiver()
    dev = QStashDev(TOKEN, CURRENT, NEXT, retry_scale=0.0001)
    async with LoopbackServer(receiver) as url, LoopbackServer(dev.app()) as dev_url:
        auth = {"Authorization": f"Bearer {TOKEN}", "Upstash-Retries": "0"}
        async with httpx.AsyncClient(base_url=dev_url) as http:
            target = f"{url}/hook%20a?x=1"
            sent = [
                (await http.post(f"/v2/publish/{target}", headers=auth, content=b"1")).json(),
                (
                    await http.post(
                        f"/v2/publish/{quote(target, safe='')}", headers=auth, content=b"2"
                    )
                ).json(),
                (await http.post("/v2/publish/http://[::1", headers=auth, content=b"3")).json(),
            ]
        messages = [dev.messages[s["messageId"]] for s in sent]
        await wait_until(lambda: all(m.state in ("DELIVERED", "FAILED") for m in messages) or None)
    assert [m.destination for m in messages[:2]] == [target, target]
    assert [m.state for m in messages] == ["DELIVERED", "DELIVERED", "FAILED"]
    assert messages[2] in dev.dlq


async def test_qstash_dev_calls_the_callback_after_delivery_and_the_failure_callback_after_the_last_retry():
    receiver = Receiver(answers=[(200, {}), (500, {}), (500, {})])
    hooks = Receiver()
    dev = QStashDev(TOKEN, CURRENT, NEXT, retry_scale=0.0001)
    async with (
        LoopbackServer(receiver) as url,
        LoopbackServer(hooks) as hooks_url,
        LoopbackServer(dev.app()) as dev_url,
    ):
        qstash = AsyncQStash(TOKEN, base_url=dev_url)
        ok = await qstash.message.publish(url=f"{url}/a", body="one", callback=f"{hooks_url}/ok")
        bad = await qstash.message.publish(
            url=f"{url}/b", body="two", retries=1, failure_callback=f"{hooks_url}/failed"
        )
        await wait_until(lambda: len(hooks.received) == 2 or None)
    calls = {orjson.loads(body)["sourceMessageId"]: (h, body) for h, body in hooks.received}
    headers, body = calls[ok.message_id]  # type: ignore[union-attr]
    done = orjson.loads(body)
    assert done["status"] == 200 and done["url"] == f"{url}/a"
    signature.verify(headers["upstash-signature"], body, f"{hooks_url}/ok", [CURRENT], leeway_s=5)
    failed = orjson.loads(calls[bad.message_id][1])  # type: ignore[union-attr]
    assert failed["status"] == 500 and failed["retried"] == 1
