"""Providers as they behave: rate windows held across replicas and settled to what the
provider reported, adaptive caps, circuits, routes, fallbacks and spill-over, against
the fake provider over HTTP and a real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import redis.asyncio as aioredis

from llmworker.guards import GuardPlan
from llmworker.keys import Keys
from llmworker.record import TaskSpec
from llmworker.worker import Worker

from .conftest import tasks_with, wait_until
from .test_executor import MESSAGES, final

ENV: dict[str, Any] = {
    "FAKEAI_BASE_URL": "",
    "MODEL_M1": "fakeai/m1",
    "MODEL_M2": "fakeai/m2",
    "MODEL_M3": "fakeai/m3",
    "MAX_M1_FREE": 4,
    "MAX_M2_FREE": 4,
    "MAX_M3_FREE": 4,
    "MAX_USER_FREE": 100,
}


def env(url: str, **extra: Any) -> dict[str, Any]:
    return {**ENV, "FAKEAI_BASE_URL": url, **extra}


async def submit(worker: Worker, model: str | list[str] | None = "m1", **fields: Any) -> str:
    body: dict[str, Any] = {"kind": "chat", "input": {"messages": MESSAGES}, **fields}
    if model is not None:
        body["model"] = model
    task_id, _ = await worker.admitter.submit(TaskSpec.model_validate(body))
    return task_id


async def all_final(worker: Worker, ids: list[str], timeout_s: float = 20) -> list[dict[str, Any]]:
    return [await final(worker, task_id, timeout_s) for task_id in ids]


def tried(record: dict[str, Any]) -> list[dict[str, Any]]:
    return list(orjson.loads(record.get("tried") or "[]"))


async def test_rpm_holds_in_every_window_across_two_replicas(make_settings, start_worker, fake_llm):
    url, fake = fake_llm
    settings = make_settings(**env(url, RPM_M1=5, RATE_WINDOW_S=1.0, MAX_M1_FREE=20))
    one = await start_worker(settings)
    two = await start_worker(settings)
    ids = [await submit(one if i % 2 else two) for i in range(16)]
    records = await all_final(one, ids)
    assert {r["status"] for r in records} == {"succeeded"}
    starts = sorted(int(r["started_at"]) for r in records)
    # No window of the configured length ever saw more than RPM_M1 starts.
    for i, start in enumerate(starts):
        in_window = [s for s in starts[i:] if s < start + 1000]
        assert len(in_window) <= 5, f"{len(in_window)} starts within 1 s from {start}"
    # ...and the limit was the only brake: 16 tasks at 5 per second take about 3 s.
    assert starts[-1] - starts[0] >= 3000
    assert starts[-1] - starts[0] < 6000
    assert fake.calls["m1"] == 16


async def test_a_model_out_of_requests_holds_back_only_itself(
    make_settings, start_worker, fake_llm
):
    url, fake = fake_llm
    worker = await start_worker(make_settings(**env(url, RPM_M1=1, RATE_WINDOW_S=30)))
    first = await final(worker, await submit(worker))
    assert first["status"] == "succeeded"
    waiting = await submit(worker)
    other = await final(worker, await submit(worker, "m2"), 3)
    assert other["status"] == "succeeded"
    stored = await worker.queue.get(waiting)
    assert stored is not None and stored["status"] == "queued"
    assert fake.calls == {"m1": 1, "m2": 1}


async def test_tpm_reserves_at_claim_and_settles_to_the_reported_usage(
    make_settings, start_worker, fake_llm, redis_url, prefix
):
    url, fake = fake_llm
    fake.config.latency_ms = 400
    worker = await start_worker(make_settings(**env(url, TPM_M1=100_000)))
    keys = Keys(prefix)
    store = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        ids = [
            await submit(worker, input={"messages": MESSAGES, "max_tokens": 50}) for _ in range(3)
        ]

        async def reserved() -> int:
            return int(await store.hget(keys.tokens_values("m1"), "_sum") or 0)  # type: ignore[misc]

        # While they run: each holds its estimate (its input, estimated, and max_tokens).
        await wait_until(lambda: fake.inflight["m1"] == 3, 5)
        held = await reserved()
        stored = await worker.queue.get(ids[0])
        assert stored is not None
        assert held == 3 * (int(stored["est_in"]) + 50)
        records = await all_final(worker, ids)
        used = sum(r["usage"]["total_tokens"] for r in records)
        # Settled: the window holds exactly what the provider reported.
        assert await reserved() == used
        entries = await store.hgetall(keys.tokens_values("m1"))  # type: ignore[misc]
        assert sorted(int(v) for k, v in entries.items() if k != "_sum") == sorted(
            r["usage"]["total_tokens"] for r in records
        )
    finally:
        await store.aclose()


async def test_token_reservations_go_back_on_cancel_failure_and_a_dead_replica(
    make_settings, start_worker, fake_llm, redis_url, prefix
):
    url, fake = fake_llm
    settings = make_settings(**env(url, TPM_M1=100_000, LEASE_TTL_S=1.0))
    worker = await start_worker(settings)
    keys = Keys(prefix)
    store = aioredis.Redis.from_url(redis_url, decode_responses=True)

    async def reserved() -> int:
        return int(await store.hget(keys.tokens_values("m1"), "_sum") or 0)  # type: ignore[misc]

    try:
        # Cancelled while it runs: nothing came back, nothing is kept.
        fake.config.latency_ms = 5000
        running = await submit(worker)
        await wait_until(lambda: fake.inflight["m1"] == 1, 5)
        assert await reserved() > 0
        await worker.queue.cancel(running, 60)
        await wait_until(lambda: fake.inflight["m1"] == 0, 5)

        async def released() -> bool:
            return await reserved() == 0

        await wait_until(released, 5)

        # Failed: refused by the provider, nothing used.
        fake.config.latency_ms = 10
        fake.config.fail_next = [400]
        failed = await final(worker, await submit(worker))
        assert failed["status"] == "failed"
        assert await reserved() == 0

        # A replica that claimed and died: its lease lapses, its reservation goes back.
        await worker.stop()
        idle = await start_worker(settings, dispatch=False)
        task_id = await submit(idle)
        claimed = await idle.queue.claim("dead", 1, 300, GuardPlan.from_settings(settings))
        assert [c.id for c in claimed] == [task_id]
        assert await reserved() > 0
        for _ in range(5):
            # Another replica keeps reaching Redis meanwhile (else the gap would read as
            # Redis being away, and leases would get a grace period).
            await idle.queue.renew("alive", 300, {})
            await asyncio.sleep(0.1)
        result = await idle.queue.reap(3, 60, 300)
        assert result.requeued == 1
        assert await reserved() == 0
    finally:
        await store.aclose()


async def test_adaptive_cap_converges_below_a_hidden_capacity_and_recovers(
    make_settings, start_worker, fake_llm
):
    url, fake = fake_llm
    fake.config.capacity = 3
    fake.config.latency_ms = 60
    worker = await start_worker(make_settings(**env(url, MAX_M1_FREE=16)))
    ids = [await submit(worker) for _ in range(120)]
    records = await all_final(worker, ids, 60)
    assert {r["status"] for r in records} == {"succeeded"}
    stats = await worker.stats()
    cap = stats["adaptive_caps"]["m1"]["cap"]
    assert 1 <= cap <= 5, stats["adaptive_caps"]
    assert stats["guards"]["m1"]["tiers"]["free"]["cap"] == cap
    # The provider met more than it takes only while the cap came down: 429s were a
    # small part of the calls.
    assert fake.errors["m1"] < 0.35 * fake.calls["m1"]

    # The capacity comes back: rounds of clean calls raise the cap again.
    fake.config.capacity = 0
    more = [await submit(worker) for _ in range(150)]
    await all_final(worker, more, 60)
    raised = (await worker.stats())["adaptive_caps"].get("m1", {"cap": 16})["cap"]
    assert raised >= cap + 4


async def test_adaptive_caps_off_keeps_the_static_limit(make_settings, start_worker, fake_llm):
    url, fake = fake_llm
    fake.config.capacity = 2
    fake.config.fail_next = [429]
    fake.config.retry_after_s = 0.01
    worker = await start_worker(make_settings(**env(url, ADAPTIVE_CAPS="false")))
    await all_final(worker, [await submit(worker) for _ in range(8)])
    stats = await worker.stats()
    assert stats["adaptive_caps"] == {}
    assert stats["guards"]["m1"]["tiers"]["free"]["cap"] == 4


async def test_a_circuit_opens_on_a_refused_key_lets_one_probe_through_and_closes(
    make_settings, start_worker, fake_llm, capsys
):
    url, fake = fake_llm
    fake.config.fail_next = [401]
    fake.config.latency_ms = 50
    worker = await start_worker(make_settings(**env(url, CIRCUIT_OPEN_S=1.0, MAX_M1_FREE=1)))
    ids = [await submit(worker) for _ in range(4)]
    await wait_until(lambda: fake.errors["m1"] == 1, 5)
    stats = await wait_until(lambda: _with_circuit(worker, "m1"), 5)
    circuit = stats["circuits"]["m1"]
    assert circuit["state"] == "open" and circuit["code"] == "provider_auth"
    # While it is open no call goes out; every task waits (none failed).
    await asyncio.sleep(0.5)
    assert fake.calls["m1"] == 1
    records = await all_final(worker, ids)
    assert {r["status"] for r in records} == {"succeeded"}
    assert fake.calls["m1"] == 5
    assert "m1" not in (await worker.stats())["circuits"]
    out = capsys.readouterr().out
    assert out.count("circuit_opened") == 1 and out.count("circuit_closed") == 1


async def _with_circuit(worker: Worker, model: str) -> dict[str, Any] | None:
    stats = await worker.stats()
    return stats if model in stats["circuits"] else None


async def test_a_probe_refused_again_reopens_the_circuit(make_settings, start_worker, fake_llm):
    url, fake = fake_llm
    fake.config.fail_next = [402, 402]
    worker = await start_worker(make_settings(**env(url, CIRCUIT_OPEN_S=0.3)))
    record = await final(worker, await submit(worker))
    assert record["status"] == "succeeded"
    assert fake.calls["m1"] == 3  # the first call, a refused probe, a probe that closed it


async def test_a_rate_limited_task_moves_to_its_next_model_at_once(
    make_settings, start_worker, fake_llm
):
    url, fake = fake_llm
    fake.config.fail_next = [429]
    fake.config.retry_after_s = 5
    worker = await start_worker(make_settings(**env(url)))
    record = await final(worker, await submit(worker, ["m1", "m2"]))
    assert record["status"] == "succeeded" and record["model"] == "m2"
    assert tried(record) == [
        {"model": "m1", "outcome": "rate_limited", "error": "provider_rate_limited"},
        {"model": "m2", "outcome": "succeeded"},
    ]
    assert fake.calls == {"m1": 1, "m2": 1}
    # m1 asked for 5 s: it is held, and the next task with m2 after it goes there directly.
    assert (await worker.stats())["held"]["m1"] > 3
    second = await final(worker, await submit(worker, ["m1", "m2"]))
    assert second["model"] == "m2" and fake.calls["m1"] == 1
    assert tried(second)[0] == {"model": "m1", "outcome": "spilled"}
    exposition = worker.metrics.exposition(None).decode()
    assert 'llmworker_fallbacks_total{from="m1",reason="rate_limited",to="m2"} 1.0' in exposition


async def test_a_refused_key_opens_the_circuit_and_the_task_moves_on(
    make_settings, start_worker, fake_llm
):
    url, fake = fake_llm
    fake.config.fail_next = [401]
    worker = await start_worker(make_settings(**env(url, CIRCUIT_OPEN_S=30)))
    record = await final(worker, await submit(worker, ["m1", "m2"]))
    assert record["model"] == "m2" and record["status"] == "succeeded"
    assert tried(record)[0]["outcome"] == "circuit_open"
    assert (await worker.stats())["circuits"]["m1"]["state"] == "open"
    # Later tasks skip m1 while its circuit is open.
    later = await final(worker, await submit(worker, ["m1", "m3"]))
    assert later["model"] == "m3" and fake.calls["m1"] == 1


async def test_a_failing_model_is_left_after_its_retries(make_settings, start_worker, fake_llm):
    url, fake = fake_llm
    fake.config.fail_next = [500, 503, 502]
    worker = await start_worker(make_settings(**env(url)))
    record = await final(worker, await submit(worker, ["m1", "m2"]))
    assert record["model"] == "m2" and record["status"] == "succeeded"
    assert tried(record)[0] == {
        "model": "m1",
        "outcome": "unavailable",
        "error": "provider_unavailable",
    }
    assert fake.calls == {"m1": 3, "m2": 1}


async def test_a_prompt_too_long_goes_to_the_next_model_with_a_larger_context(
    make_settings, start_worker, fake_llm
):
    url, fake = fake_llm
    fake.config.context = {"m1": 4}  # a prompt of 1 word and an answer of 5 take 6
    worker = await start_worker(
        make_settings(**env(url, CONTEXT_M1=4, CONTEXT_M2=4, CONTEXT_M3=100_000))
    )
    record = await final(worker, await submit(worker, ["m1", "m2", "m3"]))
    assert record["model"] == "m3" and record["status"] == "succeeded"
    assert tried(record)[0]["outcome"] == "context"
    # m1 refused it before it counted as a call; m2's context is no larger: passed over.
    assert fake.calls == {"m3": 1}


async def test_other_errors_fail_the_task_without_a_fallback(make_settings, start_worker, fake_llm):
    url, fake = fake_llm
    fake.config.fail_next = [400]
    worker = await start_worker(make_settings(**env(url)))
    record = await final(worker, await submit(worker, ["m1", "m2"]))
    assert record["status"] == "failed" and record["model"] == "m1"
    assert record["error"]["code"] == "provider_rejected"
    assert fake.calls == {"m1": 1}


async def test_no_fallback_after_the_first_answer(make_settings, start_worker, fake_llm):
    """A handler whose first call was answered and whose second fails stays on its model:
    what it has done cannot move."""
    url, fake = fake_llm

    async def twice(ctx: Any, _input: Any) -> Any:
        await ctx.llm.chat(MESSAGES)
        fake.config.fail_next = [401]
        await ctx.llm.chat(MESSAGES)
        return "done"

    worker = await start_worker(
        make_settings(**env(url, CIRCUIT_OPEN_S=0.1)), tasks_with(("twice", twice))
    )
    body = {"kind": "twice", "input": {}, "model": ["m1", "m2"]}
    task_id, _ = await worker.admitter.submit(TaskSpec.model_validate(body))
    record = await final(worker, task_id)
    assert record["status"] == "failed" and record["error"]["code"] == "provider_auth"
    assert "m2" not in fake.calls


async def test_a_task_spills_to_its_next_model_after_spill_after_s(
    make_settings, start_worker, fake_llm
):
    url, fake = fake_llm
    fake.config.latency_ms = 1500
    worker = await start_worker(make_settings(**env(url, MAX_M1_FREE=1, SPILL_AFTER_S=0.3)))
    first = await submit(worker, ["m1", "m2"])
    second = await submit(worker, ["m1", "m2"])
    records = await all_final(worker, [first, second])
    assert [r["model"] for r in records] == ["m1", "m2"]
    # The second started long before the first ended: it did not wait for m1's slot.
    assert int(records[1]["started_at"]) < int(records[0]["finished_at"]) - 800
    waited = int(records[1]["started_at"]) - int(records[1]["created_at"])
    assert 250 <= waited < 1200
    assert tried(records[1]) == [
        {"model": "m1", "outcome": "spilled"},
        {"model": "m2", "outcome": "succeeded"},
    ]


async def test_without_spill_after_s_a_task_waits_for_its_first_model(
    make_settings, start_worker, fake_llm
):
    url, fake = fake_llm
    fake.config.latency_ms = 600
    worker = await start_worker(make_settings(**env(url, MAX_M1_FREE=1)))
    ids = [await submit(worker, ["m1", "m2"]) for _ in range(2)]
    records = await all_final(worker, ids)
    assert [r["model"] for r in records] == ["m1", "m1"]


async def test_a_route_gives_the_models_of_a_kind_and_tier(make_settings, start_worker, fake_llm):
    url, _fake = fake_llm
    worker = await start_worker(make_settings(**env(url, ROUTE_CHAT_FREE="m2,m1")))
    record = await final(worker, await submit(worker, None))
    assert record["model"] == "m2" and record["models"] == "m2,m1"
    named = await final(worker, await submit(worker, "m3"))
    assert named["model"] == "m3" and "models" not in named


async def test_nothing_of_this_is_stored_for_a_plain_configuration(
    make_settings, start_worker, fake_llm, redis_url, prefix
):
    url, _fake = fake_llm
    worker = await start_worker(make_settings(**env(url)))
    record = await final(worker, await submit(worker))
    assert record["status"] == "succeeded"
    for field in ("models", "tried", "rl", "est_in", "probe"):
        assert field not in record
    store = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        found = [k async for k in store.scan_iter(match=Keys(prefix).pattern)]
    finally:
        await store.aclose()
    kinds = {k.split("}:", 1)[1].split(":", 1)[0] for k in found}
    assert not kinds & {"rpm", "tpm", "tpmv", "ms", "sp"}, kinds


async def test_a_huge_max_tokens_cannot_break_a_claim(make_settings, start_worker, fake_llm):
    url, fake = fake_llm

    async def anything(ctx: Any, _input: Any) -> Any:
        return (await ctx.llm.chat(MESSAGES)).content

    worker = await start_worker(
        make_settings(**env(url, TPM_M1=1000)), tasks_with(("anything", anything))
    )
    body = {"kind": "anything", "input": {"max_tokens": 2**64 - 1}, "model": "m1"}
    task_id, stored = await worker.admitter.submit(TaskSpec.model_validate(body))
    assert stored is not None and int(stored["max_out"]) <= 10_000_000
    record = await final(worker, task_id)
    assert record["status"] == "succeeded"
    stats = await worker.stats()
    assert stats["queues"]["free"]["waiting"] == 0 and stats["running"] == 0
    assert fake.calls["m1"] == 1


async def test_a_task_that_cannot_move_does_not_keep_a_later_one_from_moving(
    make_settings, start_worker, fake_llm
):
    url, fake = fake_llm
    worker = await start_worker(make_settings(**env(url)))
    await worker.queue.hold("m1", 10_000)
    stuck = await submit(worker, "m1", user="a")
    moved = await final(worker, await submit(worker, ["m1", "m2"], user="b"), 3)
    assert moved["status"] == "succeeded" and moved["model"] == "m2"
    stored = await worker.queue.get(stuck)
    assert stored is not None and stored["status"] == "queued"
    assert fake.calls == {"m2": 1}
