"""Running tasks: the chat kind against the fake provider over HTTP, user handlers,
provider retries and errors, deadlines, lost leases and graceful stops."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from llmworker.context import TaskContext
from llmworker.record import TaskSpec
from llmworker.routing import MAX_PAUSES
from llmworker.worker import Worker

from .conftest import tasks_with, wait_until

MESSAGES = [{"role": "user", "content": "hello"}]


async def submit(worker: Worker, **fields: Any) -> str:
    body = {"kind": "chat", "input": {"messages": MESSAGES}, **fields}
    task_id, _ = await worker.admitter.submit(TaskSpec.model_validate(body))
    return task_id


async def final(worker: Worker, task_id: str, timeout_s: float = 10) -> dict[str, Any]:
    async def ended() -> dict[str, str] | None:
        fields = await worker.queue.get(task_id)
        return (
            fields if fields and fields["status"] in ("succeeded", "failed", "cancelled") else None
        )

    fields = await wait_until(ended, timeout_s)
    record = dict(fields)
    for key in ("result", "error", "usage"):
        if record.get(key):
            record[key] = orjson.loads(record[key])
    return record


@pytest.fixture(params=["direct", "openai"])
def client(request: pytest.FixtureRequest) -> str:
    """Provider tests run on both clients: llmworker's own and the official SDK."""
    return str(request.param)


def provider_env(url: str, client: str = "direct", **extra: Any) -> dict[str, Any]:
    return {
        "PROVIDER_CLIENT": client,
        "FAKEAI_BASE_URL": url,
        "MODEL_M1": "fakeai/m1",
        "MAX_M1_FREE": 2,
        "MAX_USER_FREE": 5,
        **extra,
    }


async def test_chat_streams_from_an_openai_compatible_provider(
    make_settings, start_worker, fake_llm, client
):
    url, fake = fake_llm
    worker = await start_worker(make_settings(**provider_env(url, client), TOKEN_EVENTS="always"))
    task_id = await submit(worker, model="m1")
    record = await final(worker, task_id)
    assert record["status"] == "succeeded", record
    assert record["result"]["content"] == "tok0 tok1 tok2 tok3 tok4"
    assert record["result"]["model"] == "m1"
    assert record["usage"]["completion_tokens"] == 5
    assert fake.calls["m1"] == 1
    entries = await worker.redis.xrange(worker.keys.events(task_id))
    text = "".join(orjson.loads(e["data"])["text"] for _, e in entries if e["type"] == "tokens")
    assert text == "tok0 tok1 tok2 tok3 tok4"


async def test_provider_429_and_500_are_retried_honouring_retry_after(
    make_settings, start_worker, fake_llm, client
):
    url, fake = fake_llm
    fake.config.fail_next = [429, 500, 429]
    worker = await start_worker(make_settings(**provider_env(url, client)))
    record = await final(worker, await submit(worker, model="m1"))
    assert record["status"] == "succeeded"
    assert fake.calls["m1"] == 4 and fake.errors["m1"] == 3


async def test_a_provider_that_stops_answering_times_out_and_is_retried(
    make_settings, start_worker, fake_llm, client
):
    url, fake = fake_llm
    fake.config.fail_next = [0]  # the first call hangs
    env = provider_env(url, client, PROVIDER_TIMEOUT_S=0.3)
    worker = await start_worker(make_settings(**env))
    record = await final(worker, await submit(worker, model="m1"))
    assert record["status"] == "succeeded", record
    assert fake.calls["m1"] == 2


async def test_a_key_refused_for_good_fails_the_task_with_an_actionable_message(
    make_settings, start_worker, fake_llm, client
):
    """A 401 opens the model's circuit and the task waits for it; each probe refused
    again reopens it, and the task fails once it has waited MAX_PAUSES times."""
    url, fake = fake_llm
    fake.config.fail_next = [401] * (MAX_PAUSES + 1)
    worker = await start_worker(make_settings(**provider_env(url, client), CIRCUIT_OPEN_S=0.05))
    record = await final(worker, await submit(worker, model="m1"))
    assert record["status"] == "failed"
    assert record["error"]["code"] == "provider_auth"
    assert "FAKEAI_API_KEY" in record["error"]["message"]
    assert fake.calls["m1"] == MAX_PAUSES + 1


async def test_provider_errors_stop_being_retried_at_the_task_deadline(
    make_settings, start_worker, fake_llm, client
):
    url, fake = fake_llm
    fake.config.fail_next = [500] * 50
    fake.config.retry_after_s = 0.4
    worker = await start_worker(make_settings(**provider_env(url, client)))
    record = await final(worker, await submit(worker, model="m1", timeout_s=1.0))
    assert record["status"] == "failed"
    assert record["error"]["code"] in ("provider_unavailable", "timeout")
    assert fake.calls["m1"] < 20


async def test_unreachable_provider_is_named_in_the_error(make_settings, start_worker, client):
    worker = await start_worker(make_settings(**provider_env("http://127.0.0.1:9/v1", client)))
    record = await final(worker, await submit(worker, model="m1", timeout_s=1.5))
    assert record["status"] == "failed"
    assert "127.0.0.1:9" in record["error"]["message"] or record["error"]["code"] == "timeout"


async def test_a_handler_can_use_the_official_sdk_for_its_tasks_provider(
    make_settings, start_worker, fake_llm
):
    url, fake = fake_llm

    async def sdk(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
        reply = await ctx.openai.chat.completions.create(
            model=ctx.llm.alias.model, messages=[{"role": "user", "content": "hi"}]
        )
        return {"text": reply.choices[0].message.content}

    worker = await start_worker(make_settings(**provider_env(url)), tasks=tasks_with(("sdk", sdk)))
    task_id, _ = await worker.admitter.submit(TaskSpec(kind="sdk", model="m1"))
    record = await final(worker, task_id)
    assert record["status"] == "succeeded", record
    assert record["result"]["text"] == "tok0 tok1 tok2 tok3 tok4"
    assert fake.calls["m1"] == 1


async def test_user_handler_gets_context_progress_and_chains_a_follow_up(
    make_settings, start_worker
):
    seen: dict[str, Any] = {}

    async def outline(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
        await ctx.progress(0.5, "halfway", step="outline")
        reply = await ctx.llm.chat([{"role": "user", "content": input["topic"]}])
        follow = await ctx.submit("chat", {"messages": [{"role": "user", "content": "more"}]})
        seen.update(
            user=ctx.user, tier=ctx.tier, model=ctx.model, attempt=ctx.attempt, follow=follow
        )
        return {"outline": reply.content, "follow_up": follow}

    worker = await start_worker(
        make_settings(FAKE_LATENCY_MS=10, TOKEN_EVENTS="always"),
        tasks=tasks_with(("outline", outline)),
    )
    task_id, _ = await worker.admitter.submit(
        TaskSpec(kind="outline", input={"topic": "bees"}, user="ann", tier="paid")
    )
    record = await final(worker, task_id)
    assert record["status"] == "succeeded"
    assert "bees" in record["result"]["outline"]
    assert seen == {
        "user": "ann",
        "tier": "paid",
        "model": "fake",
        "attempt": 1,
        "follow": record["result"]["follow_up"],
    }
    follow = await final(worker, seen["follow"])
    # Users are stored per tenant (auth.py); the record shows "ann".
    assert (follow["status"], follow["user"], follow["tier"]) == (
        "succeeded",
        "default/ann",
        "paid",
    )
    entries = await worker.redis.xrange(worker.keys.events(task_id))
    progress = [orjson.loads(e["data"]) for _, e in entries if e["type"] == "progress"]
    assert progress == [{"step": "outline", "progress": 0.5, "message": "halfway"}]
    assert record["usage"]["total_tokens"] > 0


async def test_handler_exception_fails_the_task_with_its_message(make_settings, start_worker):
    async def broken(ctx: TaskContext, input: Any) -> None:
        raise ValueError("the input had no title")

    worker = await start_worker(make_settings(), tasks=tasks_with(("broken", broken)))
    task_id, _ = await worker.admitter.submit(TaskSpec(kind="broken"))
    record = await final(worker, task_id)
    assert record["status"] == "failed"
    assert record["error"] == {
        "code": "handler_error",
        "message": "The handler raised ValueError: the input had no title",
    }


async def test_task_past_its_timeout_fails_and_frees_its_slot(make_settings, start_worker):
    async def slow(ctx: TaskContext, input: Any) -> None:
        await asyncio.sleep(30)

    worker = await start_worker(make_settings(MAX_FAKE_FREE=1), tasks=tasks_with(("slow", slow)))
    task_id, _ = await worker.admitter.submit(TaskSpec(kind="slow", timeout_s=0.2))
    record = await final(worker, task_id)
    assert record["status"] == "failed" and record["error"]["code"] == "timeout"
    assert "0.2 s" in record["error"]["message"]
    after = await final(worker, await submit(worker))
    assert after["status"] == "succeeded"


def test_a_task_past_its_timeout_is_a_timeout_on_uvloop_too(make_settings):
    """uvloop's clock counts whole milliseconds: its timer may fire before
    time.monotonic() reaches the deadline; that is still the task's timeout."""
    import uvloop

    async def slow(ctx: TaskContext, input: Any) -> None:
        await asyncio.sleep(30)

    async def run() -> list[dict[str, Any]]:
        settings = make_settings(MAX_USER_FREE=50, MAX_FAKE_FREE=50)
        worker = Worker(settings, tasks=tasks_with(("slow", slow)))
        await worker.start()
        try:
            ids = [
                (await worker.admitter.submit(TaskSpec(kind="slow", timeout_s=0.013)))[0]
                for _ in range(30)
            ]
            return [await final(worker, task_id) for task_id in ids]
        finally:
            await worker.stop()

    records = uvloop.run(run())
    assert {r["error"]["code"] for r in records} == {"timeout"}


async def test_a_type_error_in_the_handler_is_reported_as_such(make_settings, start_worker):
    async def buggy(ctx: TaskContext, input: Any) -> int:
        return len(5)  # type: ignore[arg-type]

    worker = await start_worker(make_settings(), tasks=tasks_with(("buggy", buggy)))
    task_id, _ = await worker.admitter.submit(TaskSpec(kind="buggy"))
    record = await final(worker, task_id)
    assert record["error"]["message"].startswith("The handler raised TypeError:")


async def test_non_json_result_fails_with_a_clear_error(make_settings, start_worker):
    async def odd(ctx: TaskContext, input: Any) -> object:
        return object()

    worker = await start_worker(make_settings(), tasks=tasks_with(("odd", odd)))
    task_id, _ = await worker.admitter.submit(TaskSpec(kind="odd"))
    record = await final(worker, task_id)
    assert record["status"] == "failed" and "JSON-serialisable" in record["error"]["message"]


async def test_graceful_stop_hands_running_tasks_back_and_another_replica_finishes_them(
    make_settings, start_worker
):
    started = asyncio.Event()
    release = asyncio.Event()

    async def long(ctx: TaskContext, input: Any) -> str:
        started.set()
        await release.wait()
        return "done"

    tasks = tasks_with(("long", long))
    settings = make_settings(MAX_FAKE_FREE=1, SHUTDOWN_GRACE_S=0.1)
    first = await start_worker(settings, tasks=tasks)
    task_id, _ = await first.admitter.submit(TaskSpec(kind="long"))
    await asyncio.wait_for(started.wait(), 5)
    await first.stop()
    second = await start_worker(settings, tasks=tasks)
    handed = await second.queue.get(task_id)
    assert handed is not None and handed["status"] in ("queued", "running")
    release.set()
    record = await final(second, task_id)
    assert record["status"] == "succeeded" and record["result"] == "done"
    # The interrupted run is not counted against the task.
    assert record["attempts"] == "1"


async def test_lost_lease_stops_the_run_and_the_task_runs_again(make_settings, start_worker):
    runs = 0

    async def once_slow(ctx: TaskContext, input: Any) -> int:
        nonlocal runs
        runs += 1
        if runs == 1:
            await asyncio.sleep(30)
        return ctx.attempt

    settings = make_settings(MAX_FAKE_FREE=1, LEASE_TTL_S=0.6)
    worker = await start_worker(settings, tasks=tasks_with(("once_slow", once_slow)))
    task_id, _ = await worker.admitter.submit(TaskSpec(kind="once_slow"))
    await wait_until(lambda: runs == 1)
    # As if this replica had stalled past its lease: the lease lapsed and another
    # replica's claim pruned the slot.
    fields = await worker.queue.get(task_id)
    assert fields is not None
    async with worker.redis.pipeline(transaction=True) as pipe:
        pipe.zrem(worker.keys.guard_model("fake", "free"), fields["token"])
        pipe.zadd(worker.keys.running, {task_id: 1})
        await pipe.execute()
    record = await final(worker, task_id)
    assert record["status"] == "succeeded" and record["result"] == 2


async def test_replicas_only_claim_the_kinds_they_have_handlers_for(make_settings, start_worker):
    """A replica without the kind's module leaves the task to one that has it."""

    async def special(ctx: TaskContext, input: Any) -> str:
        return "done"

    settings = make_settings(MAX_FAKE_FREE=5, MAX_USER_FREE=5)
    tasks = tasks_with(("special", special))
    without = await start_worker(settings)  # dispatching, only the built-in kinds
    front_door = await start_worker(settings, tasks=tasks, dispatch=False)
    ids = [(await front_door.admitter.submit(TaskSpec(kind="special")))[0] for _ in range(3)]
    chat_id = await submit(without)
    assert (await final(without, chat_id))["status"] == "succeeded"
    # The idle replica without the handler has not touched them.
    for task_id in ids:
        fields = await without.queue.get(task_id)
        assert fields is not None and (fields["status"], fields["attempts"]) == ("queued", "0")
    await start_worker(settings, tasks=tasks)
    for task_id in ids:
        record = await final(without, task_id)
        assert (record["status"], record["result"], record["attempts"]) == (
            "succeeded",
            "done",
            "1",
        )


async def test_a_cancelled_run_stops_even_if_the_cancel_message_is_missed(
    make_settings, start_worker
):
    """Cancellation also reaches the holder through lease renewal, not only Pub/Sub."""
    started = asyncio.Event()

    async def endless(ctx: TaskContext, input: Any) -> None:
        started.set()
        await asyncio.sleep(60)

    worker = await start_worker(
        make_settings(LEASE_TTL_S=0.9), tasks=tasks_with(("endless", endless))
    )
    task_id, _ = await worker.admitter.submit(TaskSpec(kind="endless"))
    await asyncio.wait_for(started.wait(), 5)
    # Cancel as another replica would, but without the message on the cancel channel.
    fields = await worker.queue.get(task_id)
    assert fields is not None
    await worker.redis.hset(worker.keys.task(task_id), "status", "cancelled")
    await wait_until(lambda: task_id not in worker.dispatcher.runs, timeout_s=3)
    guard = await worker.redis.zrange(worker.keys.guard_model("fake", "free"), 0, -1)
    assert fields["token"] not in guard


async def test_a_draining_replica_keeps_its_leases_until_its_runs_end(make_settings, start_worker):
    """A drain longer than the lease TTL must not let another replica run the task again."""
    runs = 0
    started = asyncio.Event()

    async def slow(ctx: TaskContext, input: Any) -> int:
        nonlocal runs
        runs += 1
        started.set()
        await asyncio.sleep(2.0)
        return runs

    tasks = tasks_with(("slow", slow))
    settings = make_settings(LEASE_TTL_S=0.6, SHUTDOWN_GRACE_S=5)
    first = await start_worker(settings, tasks=tasks)
    task_id, _ = await first.admitter.submit(TaskSpec(kind="slow"))
    await asyncio.wait_for(started.wait(), 5)
    second = await start_worker(settings, tasks=tasks)
    await first.stop()  # drains: the run finishes inside the grace period
    record = await final(second, task_id)
    assert (record["status"], record["result"], record["attempts"]) == ("succeeded", 1, "1")
    assert runs == 1


async def test_a_freed_slot_is_claimed_in_the_round_trip_that_frees_it(make_settings, start_worker):
    worker = await start_worker(make_settings(FAKE_LATENCY_MS=5, MAX_FAKE_FREE=1))
    batches: list[tuple[str, ...]] = []
    pack = worker.queue.scripts._pack

    def spy(calls: list[Any]) -> bytes:
        batches.append(tuple(call.name for call in calls))
        return bytes(pack(calls))

    worker.queue.scripts._pack = spy
    ids = [await submit(worker, user=f"u{i}") for i in range(10)]
    for task_id in ids:
        assert (await final(worker, task_id))["status"] == "succeeded"
    finishes = [b for b in batches if "finish" in b]
    # One slot: each finish frees it, and the next claim travels behind it, not after it.
    riding = [b for b in finishes if "claim" in b[b.index("finish") :]]
    assert len(finishes) == 10 and len(riding) >= 9, finishes


async def test_buffered_tokens_go_out_20_ms_after_the_first_even_when_the_model_pauses(
    make_settings, start_worker
):
    async def pausing(ctx: TaskContext, input: Any) -> str:
        ctx.events.token("thinking")
        ctx.events.token(" aloud")
        await asyncio.sleep(0.5)  # fewer than 5 tokens, then a long pause
        return "done"

    worker = await start_worker(
        make_settings(TOKEN_EVENTS="always"), tasks=tasks_with(("pausing", pausing))
    )
    task_id, _ = await worker.admitter.submit(TaskSpec(kind="pausing"))
    record = await final(worker, task_id)
    entries = await worker.redis.xrange(worker.keys.events(task_id))
    tokens = [(eid, e) for eid, e in entries if e["type"] == "tokens"]
    assert [orjson.loads(e["data"])["text"] for _, e in tokens] == ["thinking aloud"]
    written_ms = int(tokens[0][0].split("-")[0])
    assert int(record["finished_at"]) - written_ms >= 400  # long before the run ended


# -- chat speaks OpenAI's chat API -----------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }
]


async def event_types(worker: Worker, task_id: str) -> list[tuple[str, dict[str, Any]]]:
    entries = await worker.redis.xrange(worker.keys.events(task_id))
    return [(e["type"], orjson.loads(e["data"])) for _, e in entries]


async def test_chat_passes_tools_and_returns_the_streamed_tool_calls(
    make_settings, start_worker, fake_llm, client
):
    url, fake = fake_llm
    worker = await start_worker(make_settings(**provider_env(url, client)))
    params = {"tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": False}
    task_id = await submit(worker, model="m1", input={"messages": MESSAGES, **params})
    record = await final(worker, task_id)
    assert record["status"] == "succeeded", record
    result = record["result"]
    assert result["finish_reason"] == "tool_calls"
    assert result["tool_calls"] == [
        {
            "id": "call_fake_1",
            "type": "function",
            "function": {"name": "search", "arguments": '{"q": "fake"}'},
        }
    ]
    assert fake.last_body["tools"] == TOOLS and fake.last_body["tool_choice"] == "auto"


async def test_reasoning_streams_as_its_own_events_and_lands_in_the_result(
    make_settings, start_worker, fake_llm, client
):
    url, _ = fake_llm
    env = provider_env(url, client, MODEL_R1="fakeai/r1-reasoner", MAX_R1_FREE=1)
    worker = await start_worker(make_settings(**env, TOKEN_EVENTS="always"))
    task_id = await submit(worker, model="r1", input={"messages": MESSAGES})
    record = await final(worker, task_id)
    assert record["result"]["reasoning_content"] == "Let me think."
    assert record["result"]["content"] == "tok0 tok1 tok2 tok3 tok4"
    kinds = [t for t, _ in await event_types(worker, task_id) if t in ("reasoning", "tokens")]
    # All the reasoning first, then the answer, each in its own event type.
    assert kinds[0] == "reasoning" and "reasoning" not in kinds[kinds.index("tokens") :]
    reasoning = "".join(
        d["text"] for t, d in await event_types(worker, task_id) if t == "reasoning"
    )
    assert reasoning == "Let me think."


async def test_several_choices_and_logprobs_come_back_whole(
    make_settings, start_worker, fake_llm, client
):
    url, _ = fake_llm
    worker = await start_worker(make_settings(**provider_env(url, client), TOKEN_EVENTS="always"))
    chat = {"messages": MESSAGES, "n": 2, "logprobs": True, "top_logprobs": 0}
    task_id = await submit(worker, model="m1", input=chat)
    result = (await final(worker, task_id))["result"]
    assert [c["content"] for c in result["choices"]] == ["tok0 tok1 tok2 tok3 tok4"] * 2
    assert [p["token"] for p in result["logprobs"]] == ["tok0", " tok1", " tok2", " tok3", " tok4"]
    # Only the first choice streams to the events.
    text = "".join(d["text"] for t, d in await event_types(worker, task_id) if t == "tokens")
    assert text == "tok0 tok1 tok2 tok3 tok4"


async def test_unknown_chat_parameters_go_to_the_provider_and_its_refusal_is_its_own(
    make_settings, start_worker, fake_llm, client
):
    url, fake = fake_llm
    worker = await start_worker(make_settings(**provider_env(url, client)))
    chat = {
        "messages": MESSAGES,
        "max_completion_tokens": 50,
        "reasoning_effort": "low",
        "vendor_knob": {"level": 3},
    }
    ok = await final(worker, await submit(worker, model="m1", input=chat))
    assert ok["status"] == "succeeded"
    assert fake.last_body["vendor_knob"] == {"level": 3}
    assert fake.last_body["reasoning_effort"] == "low"
    fake.config.reject_params = ["vendor_knob"]
    refused = await final(worker, await submit(worker, model="m1", input=chat))
    assert refused["status"] == "failed"
    assert refused["error"]["code"] == "provider_rejected"
    assert "Unrecognized request argument supplied: vendor_knob" in refused["error"]["message"]


async def test_a_404_names_the_base_url_unless_the_provider_says_the_model_is_unknown(
    make_settings, start_worker, fake_llm, client
):
    url, fake = fake_llm
    wrong_path = url.removesuffix("/v1") + "/api/v9"
    worker = await start_worker(make_settings(**provider_env(wrong_path, client)))
    record = await final(worker, await submit(worker, model="m1"))
    assert record["error"]["code"] == "provider_url_not_found"
    assert "FAKEAI_BASE_URL" in record["error"]["message"]
    await worker.stop()
    fake.config.models = ["m2"]
    other = await start_worker(make_settings(**provider_env(url, client)))
    record = await final(other, await submit(other, model="m1"))
    assert record["error"]["code"] == "provider_model_not_found"
    assert "'m1'" in record["error"]["message"]
