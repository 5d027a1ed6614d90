"""Quotas and credits, reserved at admission and settled at the end, and the ledger: on
a real Redis, the fake provider over HTTP, and real processes."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from llmworker.errors import ConfigError, QuotaExceeded
from llmworker.guards import GuardPlan
from llmworker.queue import Claimed
from llmworker.quotas import Calendar
from llmworker.settings import load_settings
from llmworker.usage import NANO
from llmworker.worker import Worker

from .conftest import llmworker_command, serve_api, wait_until
from .test_executor import MESSAGES, final
from .test_processes import _interrupt_and_resume
from .test_provider_limits import env
from .test_usage import _json, tokens_streamed

CHAT = {"kind": "chat", "model": "m1", "input": {"messages": MESSAGES, "max_tokens": 50}}


async def window(worker: Worker, user: str, period: str = "day") -> dict[str, int]:
    """The user's window today or this month: used and reserved."""
    books = worker.queue.calendar.books()
    name = books.day if period == "day" else books.month
    packed = await worker.redis.hget(f"{worker.keys.base}q:{user}:{books.month}", name)  # type: ignore[misc]
    names = ("tasks", "tokens", "nusd", "r_tasks", "r_tokens", "r_nusd")
    return dict(zip(names, map(int, (packed or "0 0 0 0 0 0").split()), strict=True))


async def reservation(worker: Worker, body: dict[str, Any], user: str = "probe") -> list[str]:
    """What one task like ``body`` reserves (its record's 'qr'), from a user of its own."""
    task_id, _stored = await worker.admitter.submit(_spec({**body, "user": user}))
    fields = await worker.queue.get(task_id)
    assert fields is not None
    return fields["qr"].split()


def _spec(body: dict[str, Any]) -> Any:
    from llmworker.record import TaskSpec

    return TaskSpec.model_validate(body)


async def _flood(
    client: httpx.AsyncClient, body: dict[str, Any], n: int = 200
) -> list[httpx.Response]:
    return list(await asyncio.gather(*(client.post("/v1/tasks", json=body) for _ in range(n))))


@pytest.mark.parametrize("measure", ["tasks", "tokens", "usd"])
async def test_200_concurrent_submissions_against_a_quota_of_20_admit_exactly_20(
    measure, make_settings, fake_llm
):
    url, fake = fake_llm
    fake.config.latency_ms = 5
    settings = make_settings(**env(url, PRICE_M1="3,15", QUOTA_FREE_TASKS_PER_DAY=10_000))
    if measure != "tasks":
        # What one task reserves, learned from a user of its own; then the limit is 20 of it.
        async with serve_api(settings, dispatch=False) as (_client, probe):
            qr = await reservation(probe, CHAT)
        need = int(qr[1]) + int(qr[2]) if measure == "tokens" else int(qr[3])
        limit = 20 * need if measure == "tokens" else f"{20 * need / NANO:.9f}"
        settings = make_settings(
            **env(url, PRICE_M1="3,15", **{f"QUOTA_FREE_{measure.upper()}_PER_DAY": limit})
        )
    else:
        settings = make_settings(**env(url, PRICE_M1="3,15", QUOTA_FREE_TASKS_PER_DAY=20))
    async with serve_api(settings) as (client, worker):
        answers = await _flood(client, {**CHAT, "user": "u1"})
        admitted = [a for a in answers if a.status_code == 202]
        refused = [a for a in answers if a.status_code == 429]
        assert len(admitted) == 20 and len(refused) == 180
        body = refused[0].json()
        assert body["error"] == "quota_exceeded" and body["quota"] == f"{measure}_per_day"
        books = worker.queue.calendar.books()
        assert 0 < int(refused[0].headers["retry-after"]) <= books.resets_in_s("tasks_per_day") + 2
        # Every admitted task finishes; what they used never passes what was allowed.
        for a in admitted:
            assert (await final(worker, a.json()["id"]))["status"] == "succeeded"
        used = await window(worker, "default/u1")
        assert used["tasks"] == 20 and used.get("r_tasks", 0) == 0
        # The actual use settles under the reservations: the quota still holds.
        if measure == "tokens":
            assert used["tokens"] <= int(settings.quotas["free"]["tokens_per_day"])
        if measure == "usd":
            assert used["nusd"] <= round(settings.quotas["free"]["usd_per_day"] * NANO)


async def test_reserve_then_settle_to_the_providers_usage_exactly(
    make_settings, start_worker, fake_llm
):
    url, _fake = fake_llm
    worker = await start_worker(
        make_settings(**env(url, PRICE_M1="3,15", QUOTA_FREE_USD_PER_MONTH=100))
    )
    task_id, _ = await worker.admitter.submit(_spec({**CHAT, "user": "ann"}))
    record = await final(worker, task_id)
    cost, usage = _json(record["cost"]), _json(record["usage"])
    for period in ("day", "month"):
        w = await window(worker, "default/ann", period)
        assert w["tasks"] == 1
        assert w["tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert w["nusd"] == round(cost["usd"] * NANO)
        assert not any(w.get(k) for k in ("r_tasks", "r_tokens", "r_nusd"))
    assert "qr" not in (await worker.queue.get(task_id) or {})
    # The metrics count the same.
    text = worker.metrics.exposition(None).decode()
    assert f'llmworker_cost_usd_total{{model="m1",tier="free"}} {cost["usd"]!r}' in text
    output = f'llmworker_tokens_total{{model="m1",tier="free",type="output"}} {usage["completion_tokens"]}.0'
    assert output in text


async def test_a_failure_before_any_token_and_a_cancel_in_the_queue_refund_everything(
    make_settings, start_worker, fake_llm
):
    url, fake = fake_llm
    settings = make_settings(**env(url, PRICE_M1="3,15", QUOTA_FREE_TASKS_PER_DAY=5))
    worker = await start_worker(settings)
    fake.config.fail_next = [400]
    failed = await final(worker, (await worker.admitter.submit(_spec({**CHAT, "user": "bo"})))[0])
    assert failed["status"] == "failed"
    idle = await start_worker(settings, dispatch=False)
    await worker.stop()
    queued, _ = await idle.admitter.submit(_spec({**CHAT, "user": "bo"}))
    assert (await window(idle, "default/bo"))["r_tasks"] == 1
    assert await idle.queue.cancel(queued, 60) == "queued"
    w = await window(idle, "default/bo")
    assert w.get("tasks", 0) == 0 and w.get("tokens", 0) == 0 and w.get("nusd", 0) == 0
    assert w["r_tasks"] == 0 and w["r_tokens"] == 0 and w["r_nusd"] == 0


async def test_a_cancelled_stream_settles_to_what_streamed(make_settings, start_worker, fake_llm):
    url, fake = fake_llm
    fake.config.latency_ms = 4000
    fake.config.tokens = 40
    worker = await start_worker(
        make_settings(**env(url, PRICE_M1="3,15", QUOTA_FREE_TOKENS_PER_DAY=100_000))
    )
    task_id, _ = await worker.admitter.submit(
        _spec({**CHAT, "user": "cy", "input": {"messages": MESSAGES, "stream": True}})
    )
    await wait_until(lambda: fake.inflight["m1"] == 1, 5)

    await wait_until(lambda: tokens_streamed(worker, task_id), 5)
    await worker.queue.cancel(task_id, 60)

    async def settled() -> dict[str, int] | None:
        w = await window(worker, "default/cy")
        return w if w.get("tokens") and not w.get("r_tokens") else None

    w = await wait_until(settled, 5)
    cost = orjson.loads((await worker.queue.get(task_id) or {})["cost"])
    assert cost["estimated"] is True
    assert w["tokens"] == cost["tokens"]["input"] + cost["tokens"]["output"]
    assert w["nusd"] == round(cost["usd"] * NANO) and w["tasks"] == 1
    entries = await worker.ledger.entries(*_today(worker), _everyone())
    [entry] = [e for e in entries if e["task"] == task_id]
    assert entry["status"] == "cancelled" and entry["estimated"] is True
    assert entry["cost_usd"] == pytest.approx(cost["usd"])


def _today(worker: Worker) -> tuple[Any, Any]:
    from datetime import date

    day = date.fromisoformat(worker.queue.calendar.day())
    return day, day


def _everyone() -> Any:
    from llmworker.ledger import Scope

    return Scope(None)


async def test_a_dead_runs_reservation_is_settled_when_its_lease_lapses(
    make_settings, start_worker, fake_llm
):
    url, _fake = fake_llm
    settings = make_settings(
        **env(url, PRICE_M1="3,15", QUOTA_FREE_TOKENS_PER_DAY=100_000, MAX_ATTEMPTS=1)
    )
    idle = await start_worker(settings, dispatch=False)
    task_id, _ = await idle.admitter.submit(_spec({**CHAT, "user": "dee"}))
    qr = (await idle.queue.get(task_id) or {})["qr"].split()
    assert (await _dead_claim(idle, settings)).id == task_id
    assert (await idle.queue.reap(1, 60, 300)).failed == 1
    w = await window(idle, "default/dee")
    # Unknown use: its estimate is charged, and nothing stays reserved.
    assert w["tokens"] == int(qr[1]) + int(qr[2]) and w["tasks"] == 1
    assert w["r_tokens"] == 0 and w["r_tasks"] == 0
    [entry] = await idle.ledger.entries(*_today(idle), _everyone())
    assert (
        entry["status"] == "failed"
        and entry["estimated"]
        and entry["price_source"] == "reservation"
    )


def test_a_killed_replicas_reservations_are_settled_and_its_tasks_reserve_again(
    redis_url: str, prefix: str, tmp_path: Path
):
    """kill -9 mid-run: each lapsed run is charged its estimate, the rerun reserves again
    and settles to what it used; nothing stays reserved."""

    def kill(proc: subprocess.Popen[bytes], fake_url: str) -> None:
        proc.kill()
        proc.wait()

    records = _interrupt_and_resume(
        redis_url, prefix, tmp_path, n=3, call_ms=3000, stop=kill, LEASE_TTL_S="1.5",
        PRICE_M1="3,15", QUOTA_FREE_TASKS_PER_DAY="100",
    )  # fmt: skip
    assert [r["status"] for r in records] == ["succeeded"] * 3

    async def check() -> None:
        settings = load_settings({"REDIS_URL": redis_url, "REDIS_PREFIX": prefix}, env_file=None)
        worker = Worker(settings, dispatch=False)
        try:
            entries = await worker.ledger.entries(*_today(worker), _everyone())
            assert sorted(e["status"] for e in entries) == ["lapsed"] * 3 + ["succeeded"] * 3
            w = await window(worker, "default/anonymous")
            assert w["tasks"] == 3 and w["r_tasks"] == 0 and w["r_tokens"] == 0
            assert w["tokens"] == sum(
                sum(e["tokens"].values()) - e["tokens"]["cached_input"] - e["tokens"]["reasoning"]
                for e in entries
            )
        finally:
            await worker.redis.aclose()

    asyncio.run(check())


def test_windows_are_days_and_months_of_the_configured_time_zone():
    shanghai = Calendar("Asia/Shanghai")
    before = shanghai.books(datetime(2026, 11, 30, 15, 59, 59, tzinfo=UTC))
    after = shanghai.books(datetime(2026, 11, 30, 16, 0, 0, tzinfo=UTC))
    assert (before.day, before.month) == ("d2026-11-30", "m2026-11")
    assert (after.day, after.month) == ("d2026-12-01", "m2026-12")
    assert before.resets_in_s("tasks_per_day") == 1
    assert before.resets_in_s("usd_per_month") == 1
    utc = Calendar().books(datetime(2026, 11, 30, 15, 59, 59, tzinfo=UTC))
    assert utc.day == "d2026-11-30" and utc.resets_in_s("tokens_per_day") == 8 * 3600 + 1
    # A day with a change of clocks still ends at midnight.
    berlin = Calendar("Europe/Berlin").books(datetime(2026, 10, 25, 12, tzinfo=UTC))
    assert berlin.day_ends.hour == 0 and berlin.resets_in_s("tasks_per_day") == 11 * 3600
    # Before the change: 23:30 of wall clock to midnight, but 24:30 hours.
    change = Calendar("Europe/Berlin").books(datetime(2026, 10, 24, 22, 30, tzinfo=UTC))
    assert change.resets_in_s("tasks_per_day") == 24 * 3600 + 30 * 60
    october = Calendar("Europe/Berlin").books(datetime(2026, 10, 10, tzinfo=UTC))
    assert october.resets_in_s("usd_per_month") == (21 * 24 + 23) * 3600


def test_bad_quota_settings_are_named():
    with pytest.raises(ConfigError) as caught:
        load_settings(
            {
                "QUOTA_FREE_TASK_PER_DAY": "5",
                "QUOTA_PAID_TOKENS_PER_DAY": "1.5",
                "QUOTA_TIMEZONE": "Mars/Base",
            },
            env_file=None,
        )
    message = str(caught.value)
    assert (
        "QUOTA_FREE_TASK_PER_DAY is not QUOTA_<TIER>_<TASKS|TOKENS|USD>_PER_<DAY|MONTH>" in message
    )
    assert "QUOTA_PAID_TOKENS_PER_DAY='1.5' must be a whole number" in message
    assert "QUOTA_TIMEZONE='Mars/Base' is not a time zone name" in message


ADMIN = "admin-key-0123456789abcdef"
TENANT = "app-key-0123456789abcdef"


async def test_a_users_own_limits_replace_the_tiers_and_only_admins_set_them(
    make_settings, fake_llm
):
    url, _fake = fake_llm
    settings = make_settings(
        **env(url, QUOTA_FREE_TASKS_PER_DAY=1, ADMIN_KEYS=ADMIN, API_KEYS=f"app:{TENANT}")
    )
    admin = {"Authorization": f"Bearer {ADMIN}"}
    app = {"Authorization": f"Bearer {TENANT}"}
    async with serve_api(settings, dispatch=False) as (client, _worker):
        body = {**CHAT, "user": "vip"}
        assert (await client.post("/v1/tasks", json=body, headers=app)).status_code == 202
        assert (await client.post("/v1/tasks", json=body, headers=app)).status_code == 429
        denied = await client.put("/v1/users/vip/quota", json={"tasks_per_day": 3}, headers=app)
        assert denied.status_code == 403
        bad = await client.put(
            "/v1/users/vip/quota?tenant=app", json={"tasks_per_week": 3}, headers=admin
        )
        assert bad.status_code == 422 and bad.json()["field"] == "tasks_per_week"
        set_ = await client.put(
            "/v1/users/vip/quota?tenant=app", json={"tasks_per_day": 3}, headers=admin
        )
        assert set_.status_code == 200 and set_.json()["day"]["limits"]["tasks"] == 3
        answers = [await client.post("/v1/tasks", json=body, headers=app) for _ in range(3)]
        assert [a.status_code for a in answers] == [202, 202, 429]
        view = (await client.get("/v1/users/vip/quota", headers=app)).json()
        assert view["day"]["reserved"]["tasks"] == 3 and view["day"]["remaining"]["tasks"] == 0
        assert view["own_limits"] == {"tasks_per_day": 3}
        # Another user of the tenant keeps the tier's limit.
        other = await client.get("/v1/users/someone/quota", headers=app)
        assert other.json()["day"]["limits"]["tasks"] == 1
        # null: back to the tier's limit.
        await client.put(
            "/v1/users/vip/quota?tenant=app", json={"tasks_per_day": None}, headers=admin
        )
        assert (await client.get("/v1/users/vip/quota", headers=app)).json()["own_limits"] == {}


async def test_credits_are_drawn_on_and_a_top_up_counts_once(make_settings, start_worker, fake_llm):
    url, _fake = fake_llm
    # A quota high enough to never matter: the probe's reservation shows a task's need.
    settings = make_settings(**env(url, PRICE_M1="3,15", QUOTA_FREE_USD_PER_MONTH=1000))
    async with serve_api(settings) as (client, worker):
        qr = await reservation(worker, CHAT)
        need_usd = int(qr[3]) / NANO
        top_up = {"usd": round(need_usd * 2.5, 9), "reference": "pay_1"}
        first = await client.post("/v1/users/eve/credits", json=top_up)
        again = await client.post("/v1/users/eve/credits", json=top_up)
        assert first.json()["applied"] is True and again.json()["applied"] is False
        assert again.json()["credits"]["usd"]["balance"] == pytest.approx(top_up["usd"])
        body = {**CHAT, "user": "eve"}
        answers = [await client.post("/v1/tasks", json=body) for _ in range(3)]
        assert [a.status_code for a in answers] == [202, 202, 402]
        assert answers[2].json()["error"] == "insufficient_credits"
        records = [await final(worker, a.json()["id"]) for a in answers[:2]]
        spent = sum(_json(r["cost"])["usd"] for r in records)
        view = (await client.get("/v1/users/eve/quota")).json()
        credits = view["credits"]["usd"]
        assert credits["reserved"] == 0
        assert credits["balance"] == pytest.approx(top_up["usd"] - spent, abs=2e-9)
        bad = await client.post("/v1/users/eve/credits", json={"usd": "five"})
        assert bad.status_code == 422 and bad.json()["field"] == "usd"


async def test_the_ledgers_export_equals_the_sum_of_the_records(make_settings, fake_llm):
    url, fake = fake_llm
    settings = make_settings(
        **env(url, PRICE_M1="3,15", ADMIN_KEYS=ADMIN, API_KEYS=f"app:{TENANT},other:x{TENANT}")
    )
    admin = {"Authorization": f"Bearer {ADMIN}"}
    app = {"Authorization": f"Bearer {TENANT}"}
    other = {"Authorization": f"Bearer x{TENANT}"}
    async with serve_api(settings) as (client, _worker):
        ids = []
        for i in range(6):
            headers = app if i % 3 else other
            answer = await client.post(
                "/v1/tasks", json={**CHAT, "user": f"u{i % 2}"}, headers=headers
            )
            ids.append(answer.json()["id"])
        fake.config.fail_next = [400]
        ids.append(
            (await client.post("/v1/tasks", json={**CHAT, "user": "u9"}, headers=app)).json()["id"]
        )
        records = [await _wait_final_any(client, task_id, (app, other)) for task_id in ids]
        entries = (await client.get("/v1/usage/entries", headers=admin)).json()["entries"]
        assert len(entries) == len(records) == 7
        by_task = {e["task"]: e for e in entries}
        for r in records:
            e = by_task[r["id"]]
            cost = r.get("cost")
            assert e["status"] == r["status"]
            assert e["cost_usd"] == (pytest.approx(cost["usd"]) if cost else None)
            assert e["tokens"] == (cost["tokens"] if cost else dict.fromkeys(e["tokens"], 0))
        total = (await client.get("/v1/usage?group_by=model", headers=admin)).json()
        assert total["total"]["cost_usd"] == pytest.approx(
            sum((r.get("cost") or {}).get("usd", 0) for r in records)
        )
        assert total["total"]["attempts"] == 7 and total["rows"][0]["model"] == "m1"
        # A tenant sees its own users only, by its own names.
        mine = (await client.get("/v1/usage?group_by=user", headers=app)).json()
        assert {row["user"] for row in mine["rows"]} == {"u0", "u1", "u9"}
        assert mine["total"]["attempts"] == 5
        assert len((await client.get("/v1/usage/entries", headers=app)).json()["entries"]) == 5
        # By day, the quiet days of the range have their rows too.
        week = (await client.get("/v1/usage?from=6d", headers=admin)).json()
        assert len(week["rows"]) == 7 and sum(r["attempts"] for r in week["rows"]) == 7
        assert week["rows"][0]["attempts"] == 0
        bad = await client.get("/v1/usage?group_by=week", headers=admin)
        assert bad.status_code == 400
        # The command line's export says the same.
        rows = list(csv.DictReader(io.StringIO(await _cli(client, "usage", "--entries", "--csv"))))
        assert sorted(r["task"] for r in rows) == sorted(e["task"] for e in entries)
        by_model = list(
            csv.DictReader(io.StringIO(await _cli(client, "usage", "--group-by", "model", "--csv")))
        )
        assert [r["model"] for r in by_model] == ["m1"]
        assert float(by_model[0]["cost_usd"]) == pytest.approx(total["total"]["cost_usd"], abs=1e-6)
        table = await _cli(client, "usage", "--since", "1d", "--group-by", "user")
        assert "total" in table.splitlines()[-1] and "by user" in table.splitlines()[0]


async def _cli(client: httpx.AsyncClient, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *llmworker_command(*args),
        env={**os.environ, "LLMWORKER_URL": str(client.base_url), "LLMWORKER_API_KEY": ADMIN},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def _wait_final_any(
    client: httpx.AsyncClient, task_id: str, headers: tuple[dict[str, str], ...]
) -> Any:
    return await wait_until(lambda: _final_any(client, task_id, headers), 20)


async def _final_any(
    client: httpx.AsyncClient, task_id: str, headers: tuple[dict[str, str], ...]
) -> Any:
    for h in headers:
        got = await client.get(f"/v1/tasks/{task_id}", headers=h)
        if got.status_code == 200 and got.json()["status"] in ("succeeded", "failed"):
            return got.json()
    return None


async def _dead_claim(worker: Worker, settings: Any, lease_ms: int = 300) -> Claimed:
    """Claim the next task as a replica that then dies; wait for its lease to lapse."""
    [claimed] = await worker.queue.claim("dead", 1, lease_ms, GuardPlan.from_settings(settings))
    for _ in range(5):
        # Another replica keeps reaching Redis meanwhile (else the gap reads as Redis away).
        await worker.queue.renew("alive", lease_ms, {})
        await asyncio.sleep(lease_ms / 3000)
    return claimed


async def test_a_lapsed_run_that_reports_after_all_is_booked_once_as_it_was(
    make_settings, start_worker, fake_llm
):
    url, _fake = fake_llm
    settings = make_settings(**env(url, PRICE_M1="3,15", QUOTA_FREE_TOKENS_PER_DAY=100_000))
    idle = await start_worker(settings, dispatch=False)
    task_id, _ = await idle.admitter.submit(_spec({**CHAT, "user": "fay"}))
    token = (await _dead_claim(idle, settings)).token
    assert (await idle.queue.reap(3, 60, 300)).requeued == 1
    cost = {"usd": 0.0001, "source": "PRICE_M1", "estimated": False,
            "tokens": {"input": 10, "cached_input": 0, "output": 20, "reasoning": 0}}  # fmt: skip
    recorded = await idle.queue.finish(
        task_id, token, "succeeded", result='"late"', ttl_s=60, cost=orjson.dumps(cost).decode()
    )
    assert recorded
    [entry] = await idle.ledger.entries(*_today(idle), _everyone())
    assert entry["status"] == "succeeded" and entry["cost_usd"] == 0.0001
    w = await window(idle, "default/fay")
    assert w["tokens"] == 30 and w["nusd"] == 100_000 and w["tasks"] == 1
    assert w["r_tokens"] == 0 and "lapsed" not in (await idle.queue.get(task_id) or {})


async def test_a_run_handed_back_mid_stream_at_shutdown_is_booked_and_its_task_keeps_its_reservation(
    make_settings, start_worker, fake_llm
):
    url, fake = fake_llm
    fake.config.latency_ms = 3000
    fake.config.tokens = 40
    settings = make_settings(
        **env(url, PRICE_M1="3,15", QUOTA_FREE_TASKS_PER_DAY=10, SHUTDOWN_GRACE_S=0)
    )
    worker = await start_worker(settings)
    task_id, _ = await worker.admitter.submit(
        _spec({**CHAT, "user": "gus", "input": {"messages": MESSAGES, "stream": True}})
    )

    await wait_until(lambda: tokens_streamed(worker, task_id), 5)
    await worker.stop()
    [entry] = await worker.ledger.entries(*_today(worker), _everyone())
    assert entry["status"] == "handed_back" and entry["estimated"] and entry["tokens"]["output"] > 0
    w = await window(worker, "default/gus")
    assert w["tokens"] > 0 and w["r_tasks"] == 1
    fake.config.latency_ms = 10
    again = await start_worker(settings)
    assert (await final(again, task_id))["status"] == "succeeded"
    statuses = [e["status"] for e in await again.ledger.entries(*_today(again), _everyone())]
    assert statuses == ["handed_back", "succeeded"]
    w = await window(again, "default/gus")
    assert w["tasks"] == 1 and w["r_tasks"] == 0 and w["r_tokens"] == 0


async def test_a_cancelled_run_whose_replica_died_is_booked_after_its_record_would_have_expired(
    make_settings, start_worker, fake_llm
):
    url, _fake = fake_llm
    settings = make_settings(
        **env(
            url, PRICE_M1="3,15", QUOTA_FREE_TASKS_PER_DAY=10, RESULT_TTL_S=1, CALLBACK_DEADLINE_S=1
        )
    )
    idle = await start_worker(settings, dispatch=False)
    await idle.quotas.add_credits("default/hal", 1.0, 0, "")
    task_id, _ = await idle.admitter.submit(_spec({**CHAT, "user": "hal"}))
    [_claimed] = await idle.queue.claim("dead", 1, 1500, GuardPlan.from_settings(settings))
    assert await idle.queue.cancel(task_id, 1) == "running"
    for _ in range(8):
        await idle.queue.renew("alive", 1500, {})
        await asyncio.sleep(0.25)
    await idle.queue.reap(3, 1, 1500)
    w = await window(idle, "default/hal")
    assert w["r_tasks"] == 0 and w["r_nusd"] == 0 and w["tasks"] == 1
    credit = await idle.redis.hgetall(f"{idle.keys.base}qu:default/hal")
    assert int(credit["r_nusd"]) == 0 and int(credit["nusd"]) < NANO
    [entry] = await idle.ledger.entries(*_today(idle), _everyone())
    assert entry["status"] == "cancelled" and entry["price_source"] == "reservation"


async def test_a_task_over_the_whole_limit_is_refused_without_a_retry_after(
    make_settings, fake_llm
):
    url, _fake = fake_llm
    settings = make_settings(**env(url, QUOTA_FREE_TOKENS_PER_DAY=1000))
    async with serve_api(settings, dispatch=False) as (client, _worker):
        big = {**CHAT, "input": {"messages": MESSAGES, "max_tokens": 5000}}
        answer = await client.post("/v1/tasks", json=big)
        assert answer.status_code == 422 and "retry-after" not in answer.headers
        refused = answer.json()
        assert refused["error"] == "task_over_quota" and refused["field"] == "input.max_tokens"
        assert "lower the task's max_tokens" in refused["message"]
        # max_completion_tokens bounds the output as max_tokens does, times the choices n.
        newer = {"messages": MESSAGES, "max_completion_tokens": 400, "n": 3}
        answer = await client.post("/v1/tasks", json={**CHAT, "input": newer})
        assert answer.json()["error"] == "task_over_quota", answer.text
        answer = await client.post("/v1/tasks", json={**CHAT, "input": {**newer, "n": 1}})
        assert answer.status_code == 202
        huge = await client.post("/v1/users/ivy/credits", json={"usd": 1e7})
        assert huge.status_code == 422 and huge.json()["field"] == "usd"
        tiny = await client.post("/v1/users/ivy/credits", json={"usd": 1e-12, "tokens": None})
        assert tiny.status_code == 422 and "nano-USD" in tiny.json()["message"]
        most = await client.post("/v1/users/ivy/credits", json={"usd": 1e6, "tokens": 10**12})
        assert most.status_code == 200
        assert most.json()["credits"]["usd"]["balance"] == 1e6
        assert most.json()["credits"]["tokens"]["balance"] == 10**12
        # A limit of 0 says so, whatever the task.
        await client.put("/v1/users/zed/quota", json={"tasks_per_day": 0})
        zero = await client.post("/v1/tasks", json={**CHAT, "user": "zed"})
        assert zero.status_code == 422 and "tasks_per_day is 0" in zero.json()["message"]
        as_text = await client.put("/v1/users/zed/quota", json={"tasks_per_day": "5"})
        assert as_text.status_code == 422 and as_text.json()["field"] == "tasks_per_day"


async def test_odd_user_ids_and_days_are_answered_clearly(make_settings, fake_llm):
    url, _fake = fake_llm
    settings = make_settings(**env(url, QUOTA_FREE_TASKS_PER_DAY=5))
    async with serve_api(settings, dispatch=False) as (client, _worker):
        # A user id with '/' is managed like any other, as such or encoded.
        assert (
            await client.post("/v1/tasks", json={**CHAT, "user": "team/ann"})
        ).status_code == 202
        for path in ("/v1/users/team/ann/quota", "/v1/users/team%2Fann/quota"):
            view = (await client.get(path)).json()
            assert view["user"] == "team/ann" and view["day"]["reserved"]["tasks"] == 1
        bad = await client.get("/v1/users/a%01b/quota")
        assert bad.status_code == 422 and bad.json()["field"] == "user"
        for query in ("from=800000d", "from=99999999999999999999d", "to=1e9", "from=2026-13-01"):
            answer = await client.get(f"/v1/usage?{query}")
            assert answer.status_code == 400 and "YYYY-MM-DD" in answer.json()["message"], query
        early = (await client.get("/v1/usage?from=0001-01-01&to=0001-01-02")).json()
        assert early["from"] == "0001-01-01"


class FixedCalendar(Calendar):
    """A calendar whose clock the test sets (windows expire by Redis's clock: keep it near)."""

    at = datetime.now(UTC)

    def books(self, at: datetime | None = None) -> Any:
        return super().books(at or self.at)


async def test_a_day_window_resets_at_midnight_in_the_configured_time_zone(
    make_settings, start_worker, fake_llm
):
    url, _fake = fake_llm
    settings = make_settings(**env(url, QUOTA_FREE_TASKS_PER_DAY=1, QUOTA_TIMEZONE="Asia/Shanghai"))
    idle = await start_worker(settings, dispatch=False)
    clock = FixedCalendar("Asia/Shanghai")
    # The next midnight in Shanghai is 16:00 UTC.
    midnight = datetime.now(UTC).replace(hour=16, minute=0, second=0, microsecond=0)
    if midnight <= datetime.now(UTC):
        midnight += timedelta(days=1)
    clock.at = midnight - timedelta(seconds=1)
    idle.queue.calendar = clock
    body = {**CHAT, "user": "jo"}
    await idle.admitter.submit(_spec(body))
    before = clock.books()
    # 23:59:59 in Shanghai: the day's one task is taken, for one more second.
    with pytest.raises(QuotaExceeded) as refused:
        await idle.admitter.submit(_spec(body))
    assert refused.value.retry_after_s == 1
    # Midnight in Shanghai: a new day.
    clock.at = midnight
    await idle.admitter.submit(_spec(body))
    after = clock.books()
    assert after.day != before.day and after.day_ends == before.day_ends + timedelta(days=1)
    # Each day's window holds its own task; the month's both (if the day was no 1st).
    assert (await window(idle, "default/jo", "day"))["r_tasks"] == 1
    month = (await window(idle, "default/jo", "month"))["r_tasks"]
    assert month == (2 if after.month == before.month else 1)
    clock.at = midnight - timedelta(seconds=1)
    assert (await window(idle, "default/jo", "day"))["r_tasks"] == 1
