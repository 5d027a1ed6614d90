"""Callbacks: signed as Standard Webhooks, retried, delivered once, never to internal hosts
unless allowed."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from standardwebhooks import Webhook

from llmworker.errors import InvalidField
from llmworker.notify import _PublicOnlyResolver, check_callback_url
from llmworker.record import TaskSpec

from .conftest import CALLBACK_SECRET, LoopbackServer, tasks_with, wait_until


@dataclass
class Receiver:
    """An app's webhook endpoint: records every request, answers from ``answers`` (then 200)."""

    answers: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.received.append((headers, body))
        status, extra = self.answers.pop(0) if self.answers else (200, {})
        if status == 0:  # never answers (a receiver that hangs until the caller leaves)
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in extra.items()],
            }
        )
        await send({"type": "http.response.body", "body": b"ok"})


def callback_env(**extra: Any) -> dict[str, Any]:
    return {
        "CALLBACK_SECRET": CALLBACK_SECRET,
        "CALLBACK_ALLOWED_HOSTS": "127.0.0.1",
        "CALLBACK_BACKOFF_S": 0.1,
        "FAKE_LATENCY_MS": 5,
        **extra,
    }


async def submit(worker: Any, url: str, **fields: Any) -> str:
    body = {"kind": "chat", "input": {"messages": [{"role": "user", "content": "hi"}]}}
    task_id, _ = await worker.admitter.submit(
        TaskSpec.model_validate({**body, "callback_url": url, **fields})
    )
    return str(task_id)


async def callback_state(worker: Any, task_id: str) -> dict[str, Any]:
    fields = await worker.queue.get(task_id)
    return {k: fields.get(k) for k in ("cb_status", "cb_attempts", "cb_error")}


async def test_a_finished_task_is_posted_to_its_callback_signed_as_standard_webhooks(
    make_settings, start_worker
):
    receiver = Receiver()
    async with LoopbackServer(receiver) as url:
        worker = await start_worker(make_settings(**callback_env()))
        task_id = await submit(worker, f"{url}/hooks/llm")
        await wait_until(lambda: len(receiver.received) == 1 or None)
        headers, body = receiver.received[0]
        record = Webhook(CALLBACK_SECRET).verify(body, headers)
        assert record["id"] == task_id and record["status"] == "succeeded"
        assert record["result"]["content"]
        assert headers["webhook-id"] == f"task_{task_id}_succeeded"
        assert headers["content-type"] == "application/json"
        state = await wait_until(lambda: _delivered(worker, task_id))
        assert state == {"cb_status": "delivered", "cb_attempts": "1", "cb_error": ""}


async def _delivered(worker: Any, task_id: str) -> dict[str, Any] | None:
    state = await callback_state(worker, task_id)
    return state if state["cb_status"] == "delivered" else None


async def test_failed_deliveries_are_retried_with_the_same_webhook_id_then_never_again(
    make_settings, start_worker
):
    receiver = Receiver(answers=[(500, {}), (503, {"Retry-After": "0"}), (502, {})])
    async with LoopbackServer(receiver) as url:
        worker = await start_worker(make_settings(**callback_env()))
        task_id = await submit(worker, f"{url}/cb")
        state = await wait_until(lambda: _delivered(worker, task_id), timeout_s=15)
        assert state["cb_attempts"] == "4"
        ids = {headers["webhook-id"] for headers, _ in receiver.received}
        assert ids == {f"task_{task_id}_succeeded"} and len(receiver.received) == 4
        for headers, body in receiver.received:
            Webhook(CALLBACK_SECRET).verify(body, headers)
        # Delivered: the outbox is empty, and no replica sends it again.
        worker.notifier.wake()
        await asyncio.sleep(0.3)
        assert len(receiver.received) == 4
        assert await worker.redis.zcard(worker.keys.callbacks) == 0
        record = (await worker.queue.get(task_id)) or {}
        assert record["cb_status"] == "delivered"


async def test_a_callback_still_failing_at_its_deadline_is_given_up_with_the_reason(
    make_settings, start_worker
):
    receiver = Receiver(answers=[(500, {})] * 100)
    async with LoopbackServer(receiver) as url:
        worker = await start_worker(make_settings(**callback_env(CALLBACK_DEADLINE_S=0.5)))
        task_id = await submit(worker, f"{url}/cb")

        async def failed() -> dict[str, Any] | None:
            state = await callback_state(worker, task_id)
            return state if state["cb_status"] == "failed" else None

        state = await wait_until(failed, timeout_s=10)
        assert "answered 500" in state["cb_error"]
        assert await worker.redis.zcard(worker.keys.callbacks) == 0


async def test_a_cancelled_task_gets_its_callback_too(make_settings, start_worker):
    receiver = Receiver()

    async def endless(ctx: Any, input: Any) -> None:
        await asyncio.sleep(60)

    async with LoopbackServer(receiver) as url:
        worker = await start_worker(
            make_settings(**callback_env()), tasks=tasks_with(("endless", endless))
        )
        task_id, _ = await worker.admitter.submit(
            TaskSpec(kind="endless", callback_url=f"{url}/cb")
        )
        await wait_until(lambda: task_id in worker.dispatcher.runs or None)
        await worker.queue.cancel(task_id, 60)
        worker.notifier.wake()
        await wait_until(lambda: receiver.received or None)
        assert orjson.loads(receiver.received[0][1])["status"] == "cancelled"


async def test_a_callback_left_by_a_dead_replica_is_delivered_by_another(
    make_settings, start_worker
):
    receiver = Receiver()
    async with LoopbackServer(receiver) as url:
        settings = make_settings(**callback_env(CALLBACK_TIMEOUT_S=0.1))
        first = await start_worker(settings)
        # The first replica finishes the task but never gets to deliver its callback.
        await first.notifier.stop()
        task_id = await submit(first, f"{url}/cb")
        await wait_until(lambda: _pending(first, task_id))
        assert (await first.stats())["callbacks_waiting"] == 1
        second = await start_worker(settings)
        second.notifier.wake()
        await wait_until(lambda: _delivered(second, task_id), timeout_s=60)
        assert len(receiver.received) == 1
        assert (await second.stats())["callbacks_waiting"] == 0


@contextlib.asynccontextmanager
async def _by_hand(make_settings: Any, start_worker: Any) -> AsyncIterator[tuple[Any, str]]:
    """A finished task whose callback is pending, with the notifier stopped: the test
    drives the attempts by hand. (The worker, the task's id.)"""
    async with LoopbackServer(Receiver()) as url:
        worker = await start_worker(make_settings(**callback_env()))
        await worker.notifier.stop()
        task_id = await submit(worker, f"{url}/cb")
        await wait_until(lambda: _pending(worker, task_id))
        yield worker, task_id


async def _pending(worker: Any, task_id: str) -> bool | None:
    return (await callback_state(worker, task_id))["cb_status"] == "pending" or None


@pytest.mark.parametrize(
    ("url", "allowed", "message"),
    [
        ("http://127.0.0.1:9000/cb", "", "internal address '127.0.0.1:9000'"),
        ("http://\u2460\u2461\u2466.0.0.1:18999/u", "", "internal address '127.0.0.1:18999'"),
        ("http://127\u30020\u30020\u30021/", "", "internal address '127.0.0.1'"),
        ("http://\uff11\uff10.\uff10.\uff10.\uff15:8080/", "", "internal address '10.0.0.5:8080'"),
        ("http://[::ffff:127.0.0.1]/cb", "", "internal address"),
        ("http://localhost./cb", "", "internal address 'localhost'"),
        ("http://10.1.2.3/cb", "", "internal address '10.1.2.3'"),
        ("http://[::1]/cb", "", "internal address '::1'"),
        ("http://169.254.169.254/latest/meta-data", "", "internal address"),
        ("http://localhost:3000/cb", "", "internal address 'localhost:3000'"),
        ("https://hooks.example.com/cb", "app.example.com", "not in CALLBACK_ALLOWED_HOSTS"),
        (
            "https://app.example.com:444/cb",
            "app.example.com:443",
            "'app.example.com:444': it is not",
        ),
    ],
)
def test_callbacks_to_internal_or_unlisted_hosts_are_refused_at_admission(
    make_settings, url, allowed, message
):
    settings = make_settings(CALLBACK_SECRET=CALLBACK_SECRET, CALLBACK_ALLOWED_HOSTS=allowed)
    with pytest.raises(InvalidField) as caught:
        check_callback_url(url, settings)
    assert caught.value.field == "callback_url" and message in caught.value.message


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://hooks.example.com/cb", ""),
        ("http://app:3000/cb", "app:3000"),
        ("https://eu.hooks.example.com/cb", "*.example.com"),
        ("http://127.0.0.1:8000/cb", "127.0.0.1"),
    ],
)
def test_public_and_listed_hosts_are_accepted(make_settings, url, allowed):
    settings = make_settings(CALLBACK_SECRET=CALLBACK_SECRET, CALLBACK_ALLOWED_HOSTS=allowed)
    check_callback_url(url, settings)


def test_callbacks_need_a_secret_to_be_signed_with(make_settings):
    with pytest.raises(InvalidField, match="CALLBACK_SECRET"):
        check_callback_url("https://hooks.example.com/cb", make_settings())


async def test_a_name_that_resolves_to_an_internal_address_is_refused_when_connecting():
    with pytest.raises(OSError, match="internal addresses"):
        await _PublicOnlyResolver([]).resolve("localhost", 80)
    assert await _PublicOnlyResolver(["localhost"]).resolve("localhost", 80)


async def test_an_attempt_that_outlived_its_turn_cannot_queue_a_delivered_callback_again(
    make_settings, start_worker
):
    async with _by_hand(make_settings, start_worker) as (worker, task_id):
        (stale,), _, _ = await worker.queue.callback_claim(10, 0)  # its turn lapses at once
        (current,), _, _ = await worker.queue.callback_claim(10, 60_000)
        assert await worker.queue.callback_end(task_id, current["cb_attempts"], "delivered")
        late = await worker.queue.callback_end(task_id, stale["cb_attempts"], "retry", 0, "x")
        assert late is False
        assert await worker.redis.zcard(worker.keys.callbacks) == 0
        assert (await callback_state(worker, task_id))["cb_status"] == "delivered"


async def test_a_receivers_retry_after_cannot_make_retries_hammer_or_stall(
    make_settings, start_worker
):
    # NaN, negative and absurd values: the backoff still applies, and the callback ends.
    answers = [(503, {"Retry-After-Ms": "nan"}), (503, {"Retry-After": "-60"}), (200, {})]
    receiver = Receiver(answers=list(answers))
    async with LoopbackServer(receiver) as url:
        worker = await start_worker(make_settings(**callback_env(CALLBACK_BACKOFF_S=0.2)))
        task_id = await submit(worker, f"{url}/cb")
        state = await wait_until(lambda: _delivered(worker, task_id), timeout_s=10)
        assert state["cb_attempts"] == "3"


async def test_a_callback_whose_host_is_no_longer_allowed_fails_at_once(
    make_settings, start_worker
):
    receiver = Receiver()
    async with LoopbackServer(receiver) as url:
        settings = make_settings(**callback_env())
        worker = await start_worker(settings)
        await worker.notifier.stop()
        task_id = await submit(worker, f"{url}/cb")
        await wait_until(lambda: _pending(worker, task_id))
        stricter = make_settings(**callback_env(CALLBACK_ALLOWED_HOSTS="app.example.com"))
        other = await start_worker(stricter)
        other.notifier.wake()

        async def failed() -> dict[str, Any] | None:
            state = await callback_state(worker, task_id)
            return state if state["cb_status"] == "failed" else None

        state = await wait_until(failed)
        assert state["cb_attempts"] == "1" and "CALLBACK_ALLOWED_HOSTS" in state["cb_error"]
        assert receiver.received == []


def _die(notifier: Any) -> None:
    """The notifier's process dies: its loops and attempts end, and nothing is recorded."""
    for loop in (notifier._loop, notifier._renewer):
        loop.cancel()
    for _attempt, task in notifier._inflight.values():
        task.cancel()


async def test_a_callback_attempt_cut_off_by_a_dead_replica_is_retried_within_seconds(
    make_settings, start_worker
):
    receiver = Receiver(answers=[(0, {})])  # the first attempt hangs
    async with LoopbackServer(receiver) as url:
        settings = make_settings(**callback_env(CALLBACK_TIMEOUT_S=300))
        first = await start_worker(settings)
        task_id = await submit(first, f"{url}/cb")
        await wait_until(lambda: receiver.received or None)
        _die(first.notifier)
        second = await start_worker(settings)
        # Not after CALLBACK_TIMEOUT_S: the dead replica's attempt stopped being renewed.
        state = await wait_until(lambda: _delivered(second, task_id), timeout_s=20)
        assert state["cb_attempts"] == "2"
        ids = {headers["webhook-id"] for headers, _ in receiver.received}
        assert len(receiver.received) == 2 and len(ids) == 1


async def test_a_callback_refused_for_its_address_at_delivery_fails_at_once(
    make_settings, start_worker
):
    """A name that passes admission but resolves to an internal address (here the
    machine's own name) is refused when connecting, and never retried."""
    import socket

    name = socket.gethostname()
    try:
        internal = not any(
            ipaddress.ip_address(info[4][0]).is_global
            for info in socket.getaddrinfo(name, 80, proto=socket.IPPROTO_TCP)
        )
    except OSError:
        internal = False
    if not internal:
        pytest.skip(f"{name} does not resolve to an internal address here")
    worker = await start_worker(
        make_settings(CALLBACK_SECRET=CALLBACK_SECRET, CALLBACK_BACKOFF_S=0.1, FAKE_LATENCY_MS=5)
    )
    task_id = await submit(worker, f"http://{name}:9/cb")

    async def failed() -> dict[str, Any] | None:
        state = await callback_state(worker, task_id)
        return state if state["cb_status"] == "failed" else None

    state = await wait_until(failed, timeout_s=10)
    assert state["cb_attempts"] == "1" and "internal addresses" in state["cb_error"]


async def test_a_late_renewal_cannot_cut_a_retrys_backoff(make_settings, start_worker):
    async with _by_hand(make_settings, start_worker) as (worker, task_id):
        (fields,), _, _ = await worker.queue.callback_claim(10, 6_000)
        attempt = fields["cb_attempts"]
        assert await worker.queue.callback_end(task_id, attempt, "retry", 600_000, "503")
        # A renewal read before the attempt ended lands after it.
        await worker.queue.callback_renew(6_000, {task_id: attempt})
        due_ms = await worker.redis.zscore(worker.keys.callbacks, task_id)
        now_s, now_us = await worker.redis.time()
        assert due_ms - (now_s * 1000 + now_us // 1000) > 500_000
