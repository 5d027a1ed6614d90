"""The claim and guard scripts on a real Redis, driven directly (no dispatcher), so each
test controls exactly who claims what and when."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from llmworker.guards import GuardPlan, smooth_schedule
from llmworker.record import TaskSpec
from llmworker.worker import Worker


async def submit(worker: Worker, n: int = 1, **fields: object) -> list[str]:
    ids = []
    for _ in range(n):
        body = {
            "kind": "chat",
            "input": {"messages": [{"role": "user", "content": "hi"}]},
            **fields,
        }
        task_id, stored = await worker.admitter.submit(TaskSpec.model_validate(body))
        assert stored is not None
        ids.append(task_id)
    return ids


async def claim(
    worker: Worker, n: int = 1, lease_ms: int = 30_000, replica: str = "r1"
) -> list[str]:
    plan = GuardPlan.from_settings(worker.settings)
    return [c.id for c in await worker.queue.claim(replica, n, lease_ms, plan)]


async def test_claim_takes_oldest_first_within_tier_and_model(make_settings, start_worker):
    worker = await start_worker(make_settings(MAX_FAKE_FREE=10, MAX_USER_FREE=10), dispatch=False)
    ids = await submit(worker, 5)
    assert await claim(worker, 5) == ids


async def test_claim_never_exceeds_model_limit_and_fills_it(make_settings, start_worker):
    worker = await start_worker(make_settings(MAX_FAKE_FREE=3, MAX_USER_FREE=100), dispatch=False)
    await submit(worker, 10)
    first = await claim(worker, 10)
    assert len(first) == 3
    assert await claim(worker, 10) == []
    stats = await worker.stats()
    assert stats["guards"]["fake"]["tiers"]["free"] == {"in_use": 3, "limit": 3, "cap": 3}
    assert stats["queues"]["free"]["waiting"] == 7


async def test_claim_skips_user_at_limit_without_blocking_others(make_settings, start_worker):
    """No head-of-line blocking: user A's backlog waits, user B's later task runs."""
    worker = await start_worker(make_settings(MAX_FAKE_FREE=10, MAX_USER_FREE=1), dispatch=False)
    a_tasks = await submit(worker, 4, user="alice")
    (b_task,) = await submit(worker, 1, user="bob")
    claimed = await claim(worker, 10)
    assert claimed == [a_tasks[0], b_task]


async def test_claim_skips_full_model_without_blocking_other_models(make_settings, start_worker):
    worker = await start_worker(
        make_settings(
            MAX_FAKE_FREE=1, MAX_USER_FREE=10, MODEL_OTHER="fake/other", MAX_OTHER_FREE=1
        ),
        dispatch=False,
    )
    fake_tasks = await submit(worker, 3, model="fake")
    (other,) = await submit(worker, 1, model="other")
    claimed = await claim(worker, 10)
    assert sorted(claimed) == sorted([fake_tasks[0], other])


async def test_model_total_limit_spans_tiers(make_settings, start_worker):
    worker = await start_worker(
        make_settings(
            MAX_FAKE_PAID=5, MAX_FAKE_FREE=5, MAX_FAKE=3, MAX_USER_PAID=9, MAX_USER_FREE=9
        ),
        dispatch=False,
    )
    await submit(worker, 4, tier="paid", user="p")
    await submit(worker, 4, tier="free", user="f")
    assert len(await claim(worker, 10)) == 3


async def test_paid_first_by_weight_and_free_never_starved(make_settings, start_worker):
    """With one shared slot, claims follow the weights 4:1: paid mostly, free regularly."""
    worker = await start_worker(
        make_settings(
            MAX_FAKE=1, MAX_FAKE_PAID=1, MAX_FAKE_FREE=1, MAX_USER_PAID=9, MAX_USER_FREE=9
        ),
        dispatch=False,
    )
    paid = set(await submit(worker, 20, tier="paid", user="p"))
    await submit(worker, 20, tier="free", user="f")
    order = []
    for _ in range(20):
        (task_id,) = await claim(worker)
        order.append("paid" if task_id in paid else "free")
        fields = await worker.queue.get(task_id)
        assert fields is not None
        await worker.queue.finish(task_id, fields["token"], "succeeded", result="{}", ttl_s=60)
    counts = Counter(order)
    assert counts == {"paid": 16, "free": 4}
    # Free's turns are spread out: never more than four paid claims in a row.
    assert (
        max(len(run) for run in "".join("p" if o == "paid" else "|" for o in order).split("|")) <= 4
    )


def test_smooth_schedule_spreads_the_lighter_tier():
    assert smooth_schedule({"paid": 4, "free": 1}) == ["paid", "paid", "free", "paid", "paid"]
    assert Counter(smooth_schedule({"a": 3, "b": 2, "c": 1})) == {"a": 3, "b": 2, "c": 1}


async def test_free_runs_when_paid_has_nothing_to_run(make_settings, start_worker):
    worker = await start_worker(make_settings(MAX_FAKE_FREE=2, MAX_USER_FREE=5), dispatch=False)
    free = await submit(worker, 2, tier="free")
    assert await claim(worker, 5) == free


async def test_expired_lease_returns_its_slot(make_settings, start_worker):
    worker = await start_worker(make_settings(MAX_FAKE_FREE=1, MAX_USER_FREE=5), dispatch=False)
    first, second = await submit(worker, 2)
    assert await claim(worker, lease_ms=200, replica="dead") == [first]
    assert await claim(worker) == []
    await asyncio.sleep(0.3)
    # The holder never renewed: its lease lapsed, so the slot serves the next task.
    assert await claim(worker) == [second]


async def test_release_frees_exactly_its_own_slot(make_settings, start_worker):
    worker = await start_worker(make_settings(MAX_FAKE_FREE=2, MAX_USER_FREE=5), dispatch=False)
    a, b, c = await submit(worker, 3)
    assert await claim(worker, 2) == [a, b]
    fields = await worker.queue.get(a)
    assert fields is not None
    token = fields["token"]
    await worker.queue.release(a, token)
    await worker.queue.release(a, token)  # a repeated release frees nothing more
    assert await claim(worker, 5) == [c]
    assert await claim(worker, 5) == []


async def test_expired_running_task_is_requeued_then_runs_once(make_settings, start_worker):
    worker = await start_worker(make_settings(MAX_FAKE_FREE=1, MAX_ATTEMPTS=3), dispatch=False)
    (task_id,) = await submit(worker)
    assert await claim(worker, lease_ms=100, replica="dead") == [task_id]
    await asyncio.sleep(0.2)
    reaped = await worker.queue.reap(max_attempts=3, ttl_s=60, lease_ms=30_000)
    assert (reaped.requeued, reaped.failed) == (1, 0)
    claimed = await worker.queue.claim("alive", 1, 30_000, GuardPlan.from_settings(worker.settings))
    assert [c.id for c in claimed] == [task_id]
    assert claimed[0].fields["attempts"] == "2"
    # The first holder comes back late: its outcome is stale and changes nothing.
    assert not await worker.queue.finish(task_id, f"{task_id}:1", "failed", error="{}", ttl_s=60)
    assert await worker.queue.finish(
        task_id, claimed[0].token, "succeeded", result='"ok"', ttl_s=60
    )
    fields = await worker.queue.get(task_id)
    assert fields is not None
    assert (fields["status"], fields["result"], fields["attempts"]) == ("succeeded", '"ok"', "2")


async def test_task_fails_after_max_attempts_of_lapsed_leases(make_settings, start_worker):
    worker = await start_worker(make_settings(MAX_FAKE_FREE=1), dispatch=False)
    (task_id,) = await submit(worker)
    for _ in range(2):
        assert await claim(worker, lease_ms=50, replica="dead") == [task_id]
        await asyncio.sleep(0.1)
        await worker.queue.reap(max_attempts=2, ttl_s=60, lease_ms=30_000)
    fields = await worker.queue.get(task_id)
    assert fields is not None
    assert fields["status"] == "failed"
    assert '"lease_expired"' in fields["error"]
    assert await claim(worker) == []


async def test_concurrent_claimers_never_exceed_limits_and_fill_them(make_settings, start_worker):
    """60 claimers in three replicas race for 4 model slots and 1 slot per user."""
    settings = make_settings(MAX_FAKE_FREE=4, MAX_USER_FREE=1)
    replicas = [await start_worker(settings, dispatch=False) for _ in range(3)]
    users = [f"u{i}" for i in range(6)]
    for i in range(120):
        await submit(replicas[0], 1, user=users[i % len(users)])
    plan = GuardPlan.from_settings(settings)
    holding: dict[str, str] = {}
    peak = 0
    done = 0

    async def claimer(worker: Worker) -> None:
        nonlocal peak, done
        while done < 120:
            claimed = await worker.queue.claim(worker.replica_id, 1, 30_000, plan)
            if not claimed:
                await asyncio.sleep(random.uniform(0, 0.002))
                continue
            task = claimed[0]
            user = task.fields["user"]
            assert user not in holding.values(), "a user got two slots"
            holding[task.id] = user
            peak = max(peak, len(holding))
            assert len(holding) <= 4, "the model limit was exceeded"
            await asyncio.sleep(random.uniform(0, 0.005))
            del holding[task.id]
            await worker.queue.finish(task.id, task.token, "succeeded", result="{}", ttl_s=60)
            done += 1

    await asyncio.wait_for(asyncio.gather(*(claimer(replicas[i % 3]) for i in range(60))), 60)
    assert done == 120
    assert peak == 4


async def test_wakes_are_published_only_while_a_dispatcher_is_idle(make_settings, start_worker):
    """Busy dispatchers claim again by themselves; only an idle one is sent a wake."""
    worker = await start_worker(make_settings(MAX_FAKE_FREE=5, MAX_USER_FREE=5), dispatch=False)
    pubsub = worker.redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(worker.keys.wake_channel)

    async def wakes() -> list[str]:
        got = []
        while (message := await pubsub.get_message(timeout=0.2)) is not None:
            got.append(message["data"])
        return got

    await submit(worker)
    assert await wakes() == []
    # A claim that comes back short marks this replica idle: now submissions wake it.
    plan = GuardPlan.from_settings(worker.settings)
    assert len(await worker.queue.claim("r1", 5, 30_000, plan, idle_ms=10_000)) == 1
    (second,) = await submit(worker)
    assert await wakes() == [second]
    # A full claim takes it off the idle list again.
    assert len(await worker.queue.claim("r1", 1, 30_000, plan, idle_ms=10_000)) == 1
    await submit(worker)
    assert await wakes() == []
    await pubsub.aclose()


async def test_scripts_are_reloaded_after_redis_forgets_them(make_settings, start_worker):
    """A restarted or flushed Redis answers NOSCRIPT: the scripts load again, calls succeed."""
    worker = await start_worker(make_settings(MAX_FAKE_FREE=5, MAX_USER_FREE=5), dispatch=False)
    await worker.redis.script_flush()
    first, second = await asyncio.gather(submit(worker), submit(worker))
    assert await claim(worker, 5) == [*first, *second]


async def test_a_replica_that_stops_cleanly_leaves_the_replica_count_at_once(
    make_settings, start_worker
):
    from .conftest import wait_until

    settings = make_settings()
    first, second = await start_worker(settings), await start_worker(settings)
    await wait_until(lambda: _alive(first, 2))
    await second.stop()
    assert await first.queue.replicas_alive() == 1


async def _alive(worker: Worker, n: int) -> bool:
    return await worker.queue.replicas_alive() == n
