"""A provider that asks to wait (a 429 with a long Retry-After) holds its model's dispatch
in the queue, not on a slot: the task goes back to waiting with its slots freed, other
models keep running, and the model takes tasks again the moment the wait is over."""

from __future__ import annotations

import time
from typing import Any

from llmworker.record import TaskSpec
from llmworker.routing import MAX_PAUSES
from llmworker.worker import Worker

from .conftest import wait_until
from .test_executor import MESSAGES, final

ENV = {
    "FAKEAI_BASE_URL": "",
    "MODEL_M1": "fakeai/m1",
    "MODEL_M2": "fakeai/m2",
    "MAX_M1_FREE": 1,
    "MAX_M2_FREE": 1,
    "MAX_USER_FREE": 5,
}


async def submit(worker: Worker, model: str) -> str:
    spec = TaskSpec.model_validate(
        {"kind": "chat", "input": {"messages": MESSAGES}, "model": model}
    )
    task_id, _ = await worker.admitter.submit(spec)
    return task_id


async def status(worker: Worker, task_id: str) -> str:
    fields = await worker.queue.get(task_id)
    assert fields is not None
    return fields["status"]


async def test_a_long_retry_after_gives_the_slot_back_and_holds_only_that_model(
    make_settings, start_worker, fake_llm
):
    url, fake = fake_llm
    fake.config.retry_after_s = 2.0
    fake.config.fail_next = [429]
    worker = await start_worker(make_settings(**{**ENV, "FAKEAI_BASE_URL": url}))
    held_at = time.monotonic()
    first = await submit(worker, "m1")

    async def handed_back() -> Any:
        fields = await worker.queue.get(first)
        return fields if fields and fields.get("pauses") == "1" else None

    fields = await wait_until(handed_back, 5)
    assert fields["status"] == "queued" and fields["attempts"] == "0"
    stats = await worker.stats()
    assert 1.0 < stats["held"]["m1"] <= 2.0
    assert stats["guards"]["m1"]["tiers"]["free"]["in_use"] == 0  # the slot is free
    # Another model is not held back; this one takes nothing until the wait is over,
    # though its slot is free.
    other = await submit(worker, "m2")
    later = await submit(worker, "m1")
    assert (await final(worker, other))["status"] == "succeeded"
    assert await status(worker, later) == "queued" and await status(worker, first) == "queued"
    assert fake.calls["m1"] == 1
    # Then both run, at once: a wake, not the dispatcher's idle wait (10 s here).
    done = [await final(worker, t, timeout_s=10) for t in (first, later)]
    assert all(r["status"] == "succeeded" for r in done), done
    assert time.monotonic() - held_at < 4.5
    started = [int(r["started_at"]) for r in done]
    assert max(started) - min(started) < 1500
    assert "held" not in (await worker.stats()) or "m1" not in (await worker.stats())["held"]


async def test_with_static_caps_a_short_retry_after_is_waited_on_the_slot(
    make_settings, start_worker, fake_llm
):
    url, fake = fake_llm  # Retry-After 0.05 s
    fake.config.fail_next = [429]
    worker = await start_worker(
        make_settings(**{**ENV, "FAKEAI_BASE_URL": url}, ADAPTIVE_CAPS="false")
    )
    record = await final(worker, await submit(worker, "m1"))
    assert record["status"] == "succeeded" and "pauses" not in record
    assert fake.calls["m1"] == 2
    assert (await worker.stats())["held"] == {}


async def test_with_adaptive_caps_a_429_gives_the_task_back_to_the_cut_cap(
    make_settings, start_worker, fake_llm
):
    url, fake = fake_llm  # Retry-After 0.05 s
    fake.config.fail_next = [429]
    worker = await start_worker(make_settings(**{**ENV, "FAKEAI_BASE_URL": url}))
    record = await final(worker, await submit(worker, "m1"))
    assert record["status"] == "succeeded" and record["pauses"] == "1"
    assert record["attempts"] == "1"  # the run that met the 429 was not an attempt
    assert fake.calls["m1"] == 2
    stats = await wait_until(lambda: _cut(worker), 5)
    assert stats["adaptive_caps"]["m1"]["cap"] < stats["adaptive_caps"]["m1"]["max"]


async def _cut(worker: Worker) -> dict[str, Any] | None:
    stats = await worker.stats()
    return stats if "m1" in stats["adaptive_caps"] else None


async def test_a_task_that_keeps_being_told_to_wait_stops_giving_its_slot_back(
    make_settings, start_worker, fake_llm
):
    url, fake = fake_llm
    fake.config.retry_after_s = 1.0
    fake.config.fail_next = [429] * 3
    settings = make_settings(**{**ENV, "FAKEAI_BASE_URL": url})
    admitting = await start_worker(settings, dispatch=False)
    task_id = await submit(admitting, "m1")
    await admitting.redis.hset(admitting.keys.task(task_id), "pauses", 7)
    # One more pause, then the run waits on its slot: the next 429s are retried in place.
    worker = await start_worker(settings)
    record = await final(worker, task_id, timeout_s=15)
    assert record["status"] == "succeeded"
    assert record["pauses"] == "8" and fake.calls["m1"] == 4


def test_openais_reset_headers_say_how_long_a_used_up_limit_lasts():
    from llmworker.providers.errors import limit_reset_s

    used_up = {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m2.5s",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "120ms",
    }
    assert limit_reset_s(used_up) == 62.5
    assert limit_reset_s({**used_up, "x-ratelimit-remaining-requests": "3"}) == 0.12
    assert (
        limit_reset_s({"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "1s"})
        is None
    )
    assert (
        limit_reset_s({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "soon"})
        is None
    )
    assert (
        limit_reset_s({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "2h"})
        == 3600
    )


async def test_a_limit_the_provider_says_is_used_up_holds_the_model_until_it_resets(
    make_settings, start_worker, fake_llm
):
    url, fake = fake_llm
    # Two requests per 2 s: the second answer says none is left, for about 2 s.
    fake.config.rpm, fake.config.window_s, fake.config.latency_ms = 2, 2.0, 20
    env = {**ENV, "FAKEAI_BASE_URL": url, "MAX_M1_FREE": 3}
    worker = await start_worker(make_settings(**env))
    ids = [await submit(worker, "m1") for _ in range(2)]
    done = [await final(worker, t) for t in ids]

    async def held() -> Any:
        return (await worker.stats())["held"].get("m1")

    assert 1.0 < await wait_until(held, 2) <= 2.0
    third = await submit(worker, "m1")
    record = await final(worker, third, timeout_s=6)
    assert record["status"] == "succeeded"
    # It waited for the window instead of meeting the provider's 429.
    assert fake.errors.get("m1", 0) == 0 and fake.calls["m1"] == 3
    assert int(record["started_at"]) - max(int(r["finished_at"]) for r in done) > 1000


def test_a_429_without_retry_after_waits_for_the_reset_its_headers_name():
    from llmworker.providers.errors import status_error
    from llmworker.settings import ModelAlias, Provider

    alias, provider = ModelAlias("m1", "p", "m1"), Provider("p", "http://p/v1", "k")
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"}
    err = status_error(429, "slow down", headers, alias, provider)
    assert err.retry_after_s == 360.0 and err.retryable
    # Retry-After, where given, wins.
    err = status_error(429, "slow down", {**headers, "retry-after": "2"}, alias, provider)
    assert err.retry_after_s == 2.0


async def test_an_account_out_of_quota_is_not_retried_and_fails_with_its_own_code(
    make_settings, start_worker, fake_llm
):
    """Out of quota is no rate limit: no retries on the slot; the circuit opens, one probe
    per opening, and the task fails with its own code once it has waited its pauses."""
    url, fake = fake_llm
    fake.config.quota_tokens = 1
    worker = await start_worker(
        make_settings(**{**ENV, "FAKEAI_BASE_URL": url}, CIRCUIT_OPEN_S=0.05)
    )
    first = await final(worker, await submit(worker, "m1"))
    assert first["status"] == "succeeded"
    record = await final(worker, await submit(worker, "m1"))
    assert record["status"] == "failed" and record["error"]["code"] == "provider_quota"
    assert "out of quota" in record["error"]["message"]
    assert fake.calls["m1"] == 2 + MAX_PAUSES
