"""Nothing computed is thrown away: an outcome that could not be stored while Redis was
away is stored when it returns, and leases do not lapse for time nobody could reach
Redis. The scripts are driven directly, as in test_claims."""

from __future__ import annotations

import asyncio

from llmworker.guards import GuardPlan

from .test_claims import claim, submit


async def test_a_late_outcome_wins_over_a_requeue_whose_task_has_not_started_again(
    make_settings, start_worker
):
    worker = await start_worker(make_settings(MAX_FAKE_FREE=1), dispatch=False)
    (task_id,) = await submit(worker, user="ann")
    assert await claim(worker, lease_ms=100, replica="cut-off") == [task_id]
    token = (await worker.queue.get(task_id) or {})["token"]
    await asyncio.sleep(0.2)
    reaped = await worker.queue.reap(max_attempts=3, ttl_s=60, lease_ms=30_000)
    assert reaped.requeued == 1
    assert (await worker.stats())["queues"]["free"]["waiting"] == 1
    # The run that was cut off from Redis comes back with its result.
    recorded = await worker.queue.finish(task_id, token, "succeeded", result='"done"', ttl_s=60)
    assert recorded
    fields = await worker.queue.get(task_id) or {}
    assert (fields["status"], fields["result"], fields["attempts"]) == ("succeeded", '"done"', "1")
    # It left the queue: nothing runs it a second time.
    assert (await worker.stats())["queues"]["free"]["waiting"] == 0
    assert await claim(worker, 5) == []
    lane_keys = [k async for k in worker.redis.scan_iter(match=f"{worker.keys.base}uq:*")]
    assert lane_keys == []


async def test_leases_do_not_lapse_for_time_in_which_nobody_reached_redis(
    make_settings, start_worker
):
    worker = await start_worker(make_settings(MAX_FAKE_FREE=1), dispatch=False)
    (task_id,) = await submit(worker)
    lease_ms = 400
    assert await claim(worker, lease_ms=lease_ms, replica="holder") == [task_id]
    token = (await worker.queue.get(task_id) or {})["token"]
    # Nobody reaches Redis for longer than the lease (it was down, say).
    await asyncio.sleep(lease_ms * 2 / 1000)
    reaped = await worker.queue.reap(max_attempts=3, ttl_s=60, lease_ms=lease_ms)
    assert (reaped.requeued, reaped.failed) == (0, 0)
    # Another replica cannot take the slot either...
    assert await claim(worker, 1, lease_ms=lease_ms, replica="other") == []
    # ...and the holder, back, still holds its lease and renews it.
    assert (await worker.queue.renew("holder", lease_ms, {task_id: token})).lost == []
    assert await worker.queue.finish(task_id, token, "succeeded", result="1", ttl_s=60)
    fields = await worker.queue.get(task_id) or {}
    assert (fields["status"], fields["attempts"]) == ("succeeded", "1")


async def test_a_holder_that_stays_gone_after_the_pause_is_reaped(make_settings, start_worker):
    worker = await start_worker(make_settings(MAX_FAKE_FREE=1), dispatch=False)
    (task_id,) = await submit(worker)
    lease_ms = 300
    assert await claim(worker, lease_ms=lease_ms, replica="dead") == [task_id]
    await asyncio.sleep(lease_ms * 2 / 1000)
    plan = GuardPlan.from_settings(worker.settings)
    # The first call after the gap opens the pause; the reaper keeps calling...
    first = await worker.queue.reap(max_attempts=3, ttl_s=60, lease_ms=lease_ms)
    assert first.requeued == 0 and first.next_lapse_ms is not None
    # ...and once every holder had a whole lease to renew, the dead one's task returns.
    deadline = asyncio.get_running_loop().time() + 5
    requeued = 0
    while not requeued:
        assert asyncio.get_running_loop().time() < deadline, "never reaped"
        await asyncio.sleep(0.05)
        requeued = (await worker.queue.reap(3, 60, lease_ms)).requeued
    claimed = await worker.queue.claim("alive", 1, 30_000, plan)
    assert [c.id for c in claimed] == [task_id] and claimed[0].fields["attempts"] == "2"


async def test_replicas_that_keep_stalling_cannot_hold_a_dead_replicas_slot_for_ever(
    make_settings, start_worker
):
    worker = await start_worker(make_settings(MAX_FAKE_FREE=1), dispatch=False)
    (task_id,) = await submit(worker)
    lease_ms = 300
    assert await claim(worker, lease_ms=lease_ms, replica="dead") == [task_id]
    loop = asyncio.get_running_loop()
    started = loop.time()
    # The only live caller reaches Redis every 250 ms: each gap is over two thirds of a
    # lease, so each one would open (or extend) a pause.
    while not (await worker.queue.reap(3, 60, lease_ms)).requeued:
        assert loop.time() - started < 3, "the pause held the dead replica's slot"
        await asyncio.sleep(0.25)
