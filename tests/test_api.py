"""The HTTP contract, over a real server on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from llmworker.worker import Worker

from .conftest import CALLBACK_SECRET, read_events, tasks_with, wait_until
from .conftest import serve_api as api

KEY_1, KEY_2 = "key-one-0123456789abcdef", "key-two-0123456789abcdef"
CHAT: dict[str, Any] = {
    "kind": "chat",
    "input": {"messages": [{"role": "user", "content": "hello"}]},
}


async def waiting(worker: Worker) -> int:
    return sum(n for key, n in (await worker.queue.depths()).items() if "|" not in key)


async def test_submit_then_get_runs_a_chat_task_to_success(make_settings):
    async with api(make_settings(FAKE_LATENCY_MS=20)) as (client, _):
        r = await client.post("/v1/tasks", json={**CHAT, "user": "u1", "tier": "paid"})
        assert r.status_code == 202
        record = r.json()
        assert r.headers["location"] == f"/v1/tasks/{record['id']}"
        assert {record["status"], record["user"], record["tier"], record["model"]} == {
            "queued",
            "u1",
            "paid",
            "fake",
        }

        async def final() -> dict[str, Any] | None:
            body = (await client.get(f"/v1/tasks/{record['id']}")).json()
            return body if body["status"] == "succeeded" else None

        done = await wait_until(final)
        assert done["result"]["content"].startswith("This is a simulated reply")
        assert done["usage"]["completion_tokens"] > 0
        assert done["attempts"] == 1
        assert done["started_at"] and done["finished_at"] and done["queue_s"] is not None


async def test_submit_answer_is_the_stored_record(make_settings):
    settings = make_settings(CALLBACK_SECRET=CALLBACK_SECRET)
    async with api(settings, dispatch=False) as (client, _worker):
        body = {
            **CHAT,
            "user": "u9",
            "tier": "paid",
            "idempotency_key": "k",
            "metadata": {"a": [1]},
        }
        submitted = (
            await client.post("/v1/tasks", json={**body, "callback_url": "https://x.test/cb"})
        ).json()
        stored = (await client.get(f"/v1/tasks/{submitted['id']}")).json()
        assert submitted == stored
        assert stored["metadata"] == {"a": [1]} and stored["idempotency_key"] == "k"


async def test_same_id_returns_the_existing_task(make_settings):
    async with api(make_settings()) as (client, _worker):
        first = await client.post("/v1/tasks", json={**CHAT, "id": "order-42"})
        again = await client.post(
            "/v1/tasks", json={**CHAT, "id": "order-42", "user": "someone-else"}
        )
        assert (first.status_code, again.status_code) == (202, 200)
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json()["id"] == "order-42" and again.json()["user"] == "anonymous"


async def test_same_idempotency_key_returns_the_existing_task(make_settings):
    async with api(make_settings(), dispatch=False) as (client, worker):
        first = (await client.post("/v1/tasks", json={**CHAT, "idempotency_key": "k-1"})).json()
        again = await client.post("/v1/tasks", json={**CHAT, "idempotency_key": "k-1"})
        assert again.status_code == 200 and again.json()["id"] == first["id"]
        assert await waiting(worker) == 1


async def test_full_tier_queue_answers_429_with_retry_after(make_settings):
    async with api(make_settings(QUEUE_MAX_FREE=2), dispatch=False) as (client, worker):
        for _ in range(2):
            assert (await client.post("/v1/tasks", json=CHAT)).status_code == 202
        r = await client.post("/v1/tasks", json=CHAT)
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        body = r.json()
        assert body["error"] == "queue_full" and "QUEUE_MAX_FREE" in body["message"]
        assert body["retry_after"] >= 1
        # Another tier still takes work.
        assert (await client.post("/v1/tasks", json={**CHAT, "tier": "paid"})).status_code == 202
        assert await waiting(worker) == 3


@pytest.mark.parametrize(
    ("body", "status", "field", "words"),
    [
        (b"{not json", 400, None, "not valid JSON"),
        (b"[1, 2]", 400, None, "JSON object"),
        (b'{"input": {}}', 422, "kind", "required"),
        (b'{"kind": "nope"}', 422, "kind", "Unknown kind"),
        (b'{"kind": 5}', 422, "kind", "invalid"),
        (b'{"kind": "sum:v2"}', 422, "kind", "invalid"),
        (
            b'{"kind": "chat", "tier": "gold", "input": {"messages": [{"role": "user", "content": "x"}]}}',
            422,
            "tier",
            "Unknown tier",
        ),
        (
            b'{"kind": "chat", "model": "nope", "input": {"messages": [{"role": "user", "content": "x"}]}}',
            422,
            "model",
            "Unknown model",
        ),
        (
            b'{"kind": "chat", "model": "ds-chat", "input": {"messages": [{"role": "user", "content": "x"}]}}',
            422,
            "model",
            "DEEPSEEK_API_KEY",
        ),
        (b'{"kind": "chat", "input": {}}', 422, "input.messages", "required"),
        (b'{"kind": "chat", "input": {"messages": []}}', 422, "input.messages", "invalid"),
        (
            b'{"kind": "chat", "input": {"messages": [{"role": "wizard"}]}}',
            422,
            "input.messages.0.role",
            "invalid",
        ),
        (
            b'{"kind": "chat", "input": {"messages": [{"role": "user", "content": "x"}], "temperature": "1"}}',
            422,
            "input.temperature",
            "The chat parameter 'temperature' is invalid",
        ),
        (b'{"kind": "chat", "tire": "paid"}', 422, "tire", "not a task field"),
        (b'{"kind": "chat", "id": "has space"}', 422, "id", "invalid"),
        (b'{"kind": "chat", "user": ""}', 422, "user", "invalid"),
        (b'{"kind": "chat", "timeout_s": -1}', 422, "timeout_s", "invalid"),
        (b'{"kind": "chat", "callback_url": "ftp://x"}', 422, "callback_url", "http"),
    ],
)
async def test_bad_input_is_refused_with_the_field_named_and_nothing_queued(
    make_settings, body, status, field, words
):
    async with api(make_settings(), dispatch=False) as (client, worker):
        r = await client.post(
            "/v1/tasks", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == status, r.text
        answer = r.json()
        assert set(answer) >= {"error", "message"}
        assert answer.get("field") == field
        assert words in answer["message"]
        assert await waiting(worker) == 0


async def test_body_over_max_body_bytes_is_413(make_settings):
    async with api(make_settings(MAX_BODY_BYTES=1000), dispatch=False) as (client, worker):
        big = {**CHAT, "metadata": {"blob": "x" * 2000}}
        r = await client.post("/v1/tasks", json=big)
        assert r.status_code == 413 and r.json()["error"] == "body_too_large"
        assert await waiting(worker) == 0


async def test_api_keys_are_required_when_set(make_settings):
    keys = f"{KEY_1},{KEY_2}"
    async with api(make_settings(API_KEYS=keys), dispatch=False) as (client, _worker):
        assert (await client.post("/v1/tasks", json=CHAT)).status_code == 401
        other = "Bearer " + "k" * 20
        wrong = await client.post("/v1/tasks", json=CHAT, headers={"Authorization": other})
        assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
        assert (await client.get("/v1/stats")).status_code == 401
        ok = await client.post("/v1/tasks", json=CHAT, headers={"Authorization": f"Bearer {KEY_2}"})
        assert ok.status_code == 202
        # Probes need no key.
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/ready")).status_code == 200


async def test_unknown_task_is_404(make_settings):
    async with api(make_settings(), dispatch=False) as (client, _):
        for r in (await client.get("/v1/tasks/nope"), await client.delete("/v1/tasks/nope")):
            assert r.status_code == 404 and r.json()["error"] == "not_found"


async def test_cancelled_queued_task_never_runs(make_settings):
    async with api(make_settings(MAX_FAKE_FREE=1, MAX_USER_FREE=1, FAKE_LATENCY_MS=300)) as (
        client,
        worker,
    ):
        first = (await client.post("/v1/tasks", json=CHAT)).json()
        second = (await client.post("/v1/tasks", json=CHAT)).json()
        r = await client.delete(f"/v1/tasks/{second['id']}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        await wait_until(lambda: _status(client, first["id"], "succeeded"))
        assert (await client.get(f"/v1/tasks/{second['id']}")).json()["attempts"] == 0
        assert await waiting(worker) == 0


async def _status(client: httpx.AsyncClient, task_id: str, status: str) -> bool:
    return bool((await client.get(f"/v1/tasks/{task_id}")).json()["status"] == status)


async def test_cancelled_running_task_stops_and_frees_its_slots(make_settings):
    settings = make_settings(MAX_FAKE_FREE=1, MAX_USER_FREE=1, FAKE_LATENCY_MS=5000)
    async with api(settings) as (client, worker):
        first = (await client.post("/v1/tasks", json=CHAT)).json()
        second = (
            await client.post(
                "/v1/tasks", json={**CHAT, "input": {**CHAT["input"], "max_tokens": 1}}
            )
        ).json()
        await wait_until(lambda: _status(client, first["id"], "running"))
        assert (await client.delete(f"/v1/tasks/{first['id']}")).json()["status"] == "cancelled"
        # The slot came back: the second task starts long before the first would have ended.
        await wait_until(lambda: _status(client, second["id"], "running"), timeout_s=3)
        await wait_until(lambda: not worker.dispatcher.runs.get(first["id"]), timeout_s=3)
        record = (await client.get(f"/v1/tasks/{first['id']}")).json()
        assert record["status"] == "cancelled" and record["result"] is None


async def test_ready_health_and_stats(make_settings):
    async with api(
        make_settings(MAX_DS_CHAT_PAID=7, DEEPSEEK_API_KEY="sk-test"), dispatch=False
    ) as (client, _worker):
        assert (await client.get("/health")).json() == {"status": "ok"}
        assert (await client.get("/ready")).json()["status"] == "ready"
        await client.post("/v1/tasks", json={**CHAT, "tier": "paid", "model": "ds-chat"})
        stats = (await client.get("/v1/stats")).json()
        assert stats["queues"]["paid"]["waiting"] == 1
        assert stats["queues"]["paid"]["models"] == {"ds-chat": 1}
        assert stats["guards"]["ds-chat"]["tiers"]["paid"] == {"in_use": 0, "limit": 7, "cap": 7}
        assert stats["replicas_alive"] >= 0


async def test_ready_is_503_while_draining(make_settings, http: Callable[..., httpx.AsyncClient]):
    async with api(make_settings()) as (client, worker):
        assert (await client.get("/ready")).status_code == 200
        await worker.dispatcher.stop(0)
        r = await client.get("/ready")
        assert r.status_code == 503 and r.json()["reason"] == "draining"


async def test_events_stream_status_and_tokens_then_the_record(make_settings):
    async with api(make_settings(FAKE_LATENCY_MS=50, FAKE_TOKENS=12)) as (client, _):
        task = (await client.post("/v1/tasks", json=CHAT)).json()
        events: list[tuple[str, str]] = []
        async with client.stream("GET", f"/v1/tasks/{task['id']}/events") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            event = ""
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    events.append((event, line[6:]))
        kinds = [e for e, _ in events]
        assert kinds[0] == "status" and kinds[-1] == "record"
        assert "tokens" in kinds
        assert '"succeeded"' in events[-1][1]


async def _read_events(
    client: httpx.AsyncClient, task_id: str, last_id: str | None = None
) -> list[tuple[str, str]]:
    """(id, event type) of each event until the stream ends with the record."""
    return [(i, kind) for i, kind, _ in await read_events(client, task_id, last_id)]


async def test_events_resume_after_last_event_id(make_settings):
    async with api(make_settings(FAKE_LATENCY_MS=30, FAKE_TOKENS=10)) as (client, _worker):
        task = (await client.post("/v1/tasks", json=CHAT)).json()
        everything = await _read_events(client, task["id"])
        assert len(everything) >= 5
        resume_from = everything[1][0]
        rest = await _read_events(client, task["id"], last_id=resume_from)
        assert rest == everything[2:]


async def test_events_of_a_finished_task_end_even_after_the_last_event(make_settings):
    async with api(make_settings(FAKE_LATENCY_MS=10, FAKE_TOKENS=2)) as (client, _worker):
        task = (await client.post("/v1/tasks", json=CHAT)).json()
        everything = await _read_events(client, task["id"])
        last_id = [i for i, kind in everything if i][-1]
        rest = await asyncio.wait_for(_read_events(client, task["id"], last_id=last_id), 5)
        assert rest == [("", "record")]


async def test_with_cors_origins_submissions_answer_preflights_and_carry_cors_headers(
    make_settings,
):
    settings = make_settings(CORS_ORIGIN="https://app.example.com")
    async with api(settings, dispatch=False) as (client, _):
        origin = {"Origin": "https://app.example.com"}
        preflight = await client.options(
            "/v1/tasks", headers={**origin, "Access-Control-Request-Method": "POST"}
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
        r = await client.post("/v1/tasks", json=CHAT, headers=origin)
        assert r.status_code == 202
        assert r.headers["access-control-allow-origin"] == "https://app.example.com"
        other = await client.post("/v1/tasks", json=CHAT, headers={"Origin": "https://evil.test"})
        assert "access-control-allow-origin" not in other.headers


async def test_a_late_reader_of_a_followed_task_still_gets_every_event_in_order(make_settings):
    async def steps(ctx: Any, input: Any) -> str:
        for i in range(6):
            await ctx.progress(message=f"step {i}")
            await asyncio.sleep(0.1)
        return "done"

    async with api(make_settings(), tasks=tasks_with(("steps", steps))) as (client, _):
        task_id = (await client.post("/v1/tasks", json={"kind": "steps"})).json()["id"]

        async def follow(after: str | None = None) -> list[str]:
            headers = {"Last-Event-ID": after} if after else {}
            messages = []
            async with client.stream("GET", f"/v1/tasks/{task_id}/events", headers=headers) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and '"message"' in line:
                        messages.append(json.loads(line[6:])["message"])
            return messages

        early = asyncio.create_task(follow())
        await asyncio.sleep(0.35)  # the first reader has seen a few steps
        late = await follow()
        assert await early == late == [f"step {i}" for i in range(6)]


@pytest.mark.parametrize("given", ["garbage", "12-x", "-1", "1-2-3"])
async def test_a_malformed_last_event_id_is_refused_with_its_name(make_settings, given):
    async with api(make_settings(), dispatch=False) as (client, _):
        task_id = (await client.post("/v1/tasks", json=CHAT)).json()["id"]
        r = await client.get(f"/v1/tasks/{task_id}/events", headers={"Last-Event-ID": given})
        assert r.status_code == 400 and "Last-Event-ID" in r.json()["message"]
