"""Seeing it run: /metrics (names, labels, values, auth, --workers), the stats behind the
dashboard, failures and retry, provider health over replicas, and traces."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmworker.observe import tracing
from llmworker.openapi import Failures, Stats, TaskRecord
from llmworker.record import TaskSpec

from .conftest import (
    CALLBACK_SECRET,
    LoopbackServer,
    free_port,
    llmworker_command,
    process,
    tasks_with,
    wait_until,
    worker_env,
)
from .conftest import serve_api as api
from .test_notify import Receiver
from .test_ops import COUNTERS, GAUGES, HISTOGRAMS
from .test_processes import wait_ready

ADMIN = "admin-key-0123456789abcdef"
TENANT_KEY = "tenant-key-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "hello"}]
CHAT: dict[str, Any] = {"kind": "chat", "input": {"messages": MESSAGES}}

# Every name the ops kit's dashboard and alerts rely on (as the parser names families).
REQUIRED = {name.removesuffix("_total") for name in COUNTERS | GAUGES | HISTOGRAMS}


def alias() -> str:
    """A model alias of this test alone: the process's counters are shared by tests."""
    return f"ob-{uuid.uuid4().hex[:8]}"


def model_env(name: str, url: str, **extra: Any) -> dict[str, Any]:
    token = name.upper().replace("-", "_")
    return {
        "FAKEAI_BASE_URL": url,
        f"MODEL_{token}": f"fakeai/{name}",
        f"MAX_{token}_FREE": 3,
        f"MAX_{token}_PAID": 2,
        "MAX_USER_FREE": 5,
        "DEFAULT_MODEL": name,
        **extra,
    }


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def families(text: str) -> set[str]:
    return {f.name for f in text_string_to_metric_families(text)}


def value(scrape: dict[Any, float], name: str, **labels: str) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


async def final(client: httpx.AsyncClient, task_id: str, **params: str) -> dict[str, Any]:
    async def ended() -> dict[str, Any] | None:
        body = (await client.get(f"/v1/tasks/{task_id}", params=params)).json()
        return body if body["status"] in ("succeeded", "failed", "cancelled") else None

    result: dict[str, Any] = await wait_until(ended, 15)
    return result


async def test_metrics_count_tasks_provider_calls_and_rejections_with_no_user_or_task_labels(
    make_settings, fake_llm
):
    url, fake = fake_llm
    name = alias()
    fake.config.fail_next = [429, 500]
    settings = make_settings(**model_env(name, url, QUEUE_MAX_FREE=3))
    async with api(settings, dispatch=False) as (client, worker):
        before = samples((await client.get("/metrics")).text)
        ids = []
        for i in range(3):
            r = await client.post("/v1/tasks", json={**CHAT, "user": f"secret-user-{i}"})
            ids.append(r.json()["id"])
        full = await client.post("/v1/tasks", json=CHAT)
        assert full.status_code == 429
        bad = await client.post("/v1/tasks", json={"kind": "chat"})
        assert bad.status_code == 422
        worker.dispatcher.start()
        for task_id in ids:
            assert (await final(client, task_id))["status"] == "succeeded"
        r = await client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
    assert families(text) >= REQUIRED, REQUIRED - families(text)
    after = samples(text)
    free = {"tier": "free", "model": name}
    assert value(after, "llmworker_tasks_submitted_total", **free, source="api") == 3
    assert value(after, "llmworker_tasks_finished_total", **free, status="succeeded") == 3
    assert value(after, "llmworker_task_run_seconds_count", **free, status="succeeded") == 3
    assert value(after, "llmworker_task_queue_seconds_count", **free) == 3
    for reason, n in (("queue_full", 1), ("invalid_field", 1)):
        key = "llmworker_tasks_rejected_total"
        assert value(after, key, reason=reason) - value(before, key, reason=reason) == n
    # The first task's call was refused twice (429, then 500) before it went through.
    for outcome, n in (("ok", 3), ("rate_limited", 1), ("server_error", 1)):
        assert value(after, "llmworker_provider_requests_total", model=name, outcome=outcome) == n
    assert value(after, "llmworker_provider_ttft_seconds_count", model=name) == 3
    genai = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "fakeai"}
    genai["gen_ai_request_model"] = name
    ok_calls = value(
        after, "gen_ai_client_operation_duration_seconds_count", **genai, error_type=""
    )
    assert ok_calls == 3
    limited = {**genai, "error_type": "provider_rate_limited"}
    assert value(after, "gen_ai_client_operation_duration_seconds_count", **limited) == 1
    for kind in ("input", "output"):
        tokens = {**genai, "gen_ai_token_type": kind}
        assert value(after, "gen_ai_client_token_usage_count", **tokens) == 3
    assert value(after, "gen_ai_client_token_usage_sum", **genai, gen_ai_token_type="output") == 15
    # Label values are tiers, models, statuses, outcomes and codes: never a user or a task.
    for _name, labels in after:
        for _label, label_value in labels:
            assert "secret-user" not in label_value
            assert all(task_id not in label_value for task_id in ids)


async def test_deployment_gauges_come_from_redis_the_same_on_every_replica(make_settings):
    settings = make_settings(MAX_FAKE_PAID=2, MAX_FAKE=5, FAKE_LATENCY_MS=60_000)
    async with (
        api(settings, dispatch=False) as (client, worker),
        api(settings, dispatch=False) as (other, _),
    ):
        for user in ("a", "b"):
            await client.post("/v1/tasks", json={**CHAT, "user": user, "tier": "paid"})
        # Only paid tasks wait: the claim takes the oldest, a's.
        await worker.queue.claim(worker.replica_id, 1, 30_000, worker.dispatcher.plan)
        await asyncio.sleep(0.3)
        await client.post("/v1/tasks", json={**CHAT, "tier": "free"})
        scrapes = [samples((await c.get("/metrics")).text) for c in (client, other)]
    for name in ("llmworker_queue_waiting", "llmworker_tasks_running"):
        for tier in ("paid", "free"):
            got = [value(s, name, tier=tier, model="fake") for s in scrapes]
            assert got[0] == got[1], (name, tier, got)
    s = scrapes[1]
    assert value(s, "llmworker_queue_waiting", tier="paid", model="fake") == 1
    assert value(s, "llmworker_queue_waiting", tier="free", model="fake") == 1
    assert value(s, "llmworker_tasks_running", tier="paid", model="fake") == 1
    # The paid task left waiting is the second, 0.3 s older than the free one.
    paid_age = value(s, "llmworker_queue_oldest_age_seconds", tier="paid", model="fake")
    free_age = value(s, "llmworker_queue_oldest_age_seconds", tier="free", model="fake")
    assert paid_age >= free_age + 0.25 > 0.25
    assert value(s, "llmworker_guard_slots_used", guard="model:fake:paid") == 1
    assert value(s, "llmworker_guard_slots_limit", guard="model:fake:paid") == 2
    assert value(s, "llmworker_guard_slots_limit", guard="model:fake") == 5
    assert value(s, "llmworker_callbacks_pending") == 0


async def test_metrics_take_an_admin_key_unless_public_and_can_be_switched_off(make_settings):
    keys = {"API_KEYS": f"app:{TENANT_KEY}", "ADMIN_KEYS": ADMIN}
    async with api(make_settings(**keys), dispatch=False) as (client, _):
        assert (await client.get("/metrics")).status_code == 401
        tenant = {"Authorization": f"Bearer {TENANT_KEY}"}
        assert (await client.get("/metrics", headers=tenant)).status_code == 403
        admin = {"Authorization": f"Bearer {ADMIN}"}
        assert (await client.get("/metrics", headers=admin)).status_code == 200
    async with api(make_settings(**keys, METRICS_PUBLIC="true"), dispatch=False) as (client, _):
        assert (await client.get("/metrics")).status_code == 200
    async with api(make_settings(METRICS_ENABLED="false"), dispatch=False) as (client, _):
        r = await client.get("/metrics")
        assert r.status_code == 404 and "METRICS_ENABLED" in r.json()["message"]


def test_with_workers_every_scrape_counts_every_process(
    redis_url: str, prefix: str, tmp_path: Path
):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = worker_env(redis_url, prefix, FAKE_LATENCY_MS="20", MAX_FAKE_PAID="20")
    command = llmworker_command("serve", "--workers", "2", "--port", str(port))
    with process(command, env, tmp_path / "serve.log"):
        wait_ready(base)
        body = {**CHAT, "tier": "paid"}
        # New connections spread over both processes.
        for _ in range(40):
            assert httpx.post(f"{base}/v1/tasks", json=body).status_code == 202

        def counts() -> tuple[float, float]:
            scrape = samples(httpx.get(f"{base}/metrics").text)
            lane = {"tier": "paid", "model": "fake"}
            return (
                value(scrape, "llmworker_tasks_submitted_total", **lane, source="api"),
                value(scrape, "llmworker_tasks_finished_total", **lane, status="succeeded"),
            )

        # Scrapes land on either process (each a new connection); whichever answers, a
        # count never goes back, and soon every scrape has every process's counts.
        seen = [counts()]
        deadline = time.monotonic() + 20
        while seen[-1] != (40, 40):
            assert time.monotonic() < deadline, (
                seen[-5:],
                (tmp_path / "serve.log").read_text()[-2000:],
            )
            time.sleep(0.05)
            seen.append(counts())
        seen += [counts() for _ in range(10)]
        for before, after in itertools.pairwise(seen):
            assert after[0] >= before[0] and after[1] >= before[1], seen
        assert seen[-10:] == [(40, 40)] * 10
        assert value(samples(httpx.get(f"{base}/metrics").text), "llmworker_replicas") == 2


async def test_stats_show_lanes_oldest_wait_throughput_and_running_tasks(make_settings):
    async def slow(ctx: Any, data: Any) -> str:
        await asyncio.sleep(30)
        return "done"

    tasks = tasks_with(("slow", slow))
    settings = make_settings(MAX_USER_FREE=1, FAKE_LATENCY_MS=10)
    async with api(settings, tasks=tasks) as (client, worker):
        quick = await client.post("/v1/tasks", json={**CHAT, "user": "q"})
        await final(client, quick.json()["id"])
        running = (await client.post("/v1/tasks", json={"kind": "slow", "user": "u"})).json()
        waiting = (await client.post("/v1/tasks", json={"kind": "slow", "user": "u"})).json()

        async def both_seen() -> dict[str, Any] | None:
            stats: dict[str, Any] = (await client.get("/v1/stats")).json()
            return stats if stats["running_tasks"] and stats["lanes"][1]["waiting"] else None

        await asyncio.sleep(0.2)
        stats = await wait_until(both_seen)
        Stats.model_validate(stats)
        lanes = {(lane["tier"], lane["model"]): lane for lane in stats["lanes"]}
        free = lanes[("free", "fake")]
        assert free["waiting"] == 1 and free["running"] == 1 and free["limit"] == 3
        assert free["oldest_wait_s"] >= 0.15
        assert lanes[("paid", "fake")]["oldest_wait_s"] is None
        assert [t["id"] for t in stats["running_tasks"]] == [running["id"]]
        assert stats["running_tasks"][0]["user"] == "u"
        assert (
            len(stats["throughput"]["succeeded"]) == 60
            and stats["throughput"]["succeeded"][-1] >= 1
        )
        await worker.health.flush()
        fake = (await client.get("/v1/stats")).json()["providers"]["fake"]
        assert fake["requests"]["ok"] == 1 and fake["duration_p50_s"] is not None
        assert fake["ttft_p95_s"] is not None
        await client.delete(f"/v1/tasks/{waiting['id']}")
        await client.delete(f"/v1/tasks/{running['id']}")


async def test_provider_health_is_counted_in_redis_for_every_replica(make_settings, start_worker):
    settings = make_settings(FAKE_LATENCY_MS=10)
    first = await start_worker(settings)
    second = await start_worker(settings, dispatch=False)
    task_id, _ = await first.admitter.submit(TaskSpec(kind="chat", input={"messages": MESSAGES}))

    async def done() -> bool:
        fields = await first.queue.get(task_id)
        return bool(fields and fields["status"] == "succeeded")

    await wait_until(done)
    await first.health.flush()
    seen = (await second.stats())["providers"]
    assert seen["fake"]["requests"]["ok"] == 1


async def test_failures_are_listed_filtered_and_a_retry_makes_a_new_task(make_settings):
    keys = {"API_KEYS": f"app:{TENANT_KEY}", "ADMIN_KEYS": ADMIN, "FAKE_LATENCY_MS": 300}
    admin = {"Authorization": f"Bearer {ADMIN}"}
    tenant = {"Authorization": f"Bearer {TENANT_KEY}"}
    async with api(make_settings(**keys)) as (client, _):
        body = {**CHAT, "user": "u7", "metadata": {"m": 1}}
        timed_out = (
            await client.post("/v1/tasks", json={**body, "timeout_s": 0.05}, headers=tenant)
        ).json()
        cancelled = (
            await client.post("/v1/tasks", json={**body, "tier": "paid"}, headers=tenant)
        ).json()
        await client.delete(f"/v1/tasks/{cancelled['id']}", headers=tenant)
        await wait_until(lambda: _status(client, timed_out["id"], tenant, "failed"))

        listed = (await client.get("/v1/failures", headers=admin)).json()
        Failures.model_validate(listed)
        # Newest first: the cancel came at once, the timeout 50 ms later.
        assert [f["id"] for f in listed["failures"]] == [timed_out["id"], cancelled["id"]]
        assert listed["facets"] == {
            "status": ["cancelled", "failed"],
            "model": ["fake"],
            "error": ["timeout"],
        }
        first = listed["failures"][0]
        assert first["tenant"] == "app" and first["user"] == "u7"
        assert first["error"]["code"] == "timeout"
        only = (await client.get("/v1/failures", params={"error": "timeout"}, headers=admin)).json()
        assert [f["id"] for f in only["failures"]] == [timed_out["id"]]
        none = (
            await client.get(
                "/v1/failures", params={"status": "failed", "model": "gpt"}, headers=admin
            )
        ).json()
        assert none["failures"] == []
        assert (await client.get("/v1/failures", headers=tenant)).status_code == 403
        assert (
            await client.get("/v1/failures", params={"limit": "0"}, headers=admin)
        ).status_code == 400

        # A retry is JSON, as a submission is: a cross-site form cannot send one.
        retry = f"/v1/tasks/{timed_out['id']}/retry"
        form = {**tenant, "Content-Type": "application/x-www-form-urlencoded"}
        assert (await client.post(retry, content=b"", headers=form)).status_code == 415
        # The admin retries the tenant's task: a new task of that tenant, same input.
        r = await client.post(retry, json={}, params={"tenant": "app"}, headers=admin)
        assert r.status_code == 202, r.text
        again = r.json()
        TaskRecord.model_validate(again)
        assert again["id"] != timed_out["id"] and again["retry_of"] == timed_out["id"]
        assert (again["tenant"], again["user"], again["kind"], again["metadata"]) == (
            "app",
            "u7",
            "chat",
            {"m": 1},
        )
        seen = (await client.get(f"/v1/tasks/{again['id']}", headers=tenant)).json()
        assert seen["retry_of"] == timed_out["id"]
        # Once per task: a second retry (a double click) is answered with the first.
        twice = await client.post(retry, json={}, headers=tenant)
        assert twice.status_code == 200 and twice.json()["id"] == again["id"]
        assert twice.headers["idempotent-replayed"] == "true"
        old = (await client.get(f"/v1/tasks/{timed_out['id']}", headers=tenant)).json()
        assert old["retried_as"] == again["id"]
        listed = (
            await client.get("/v1/failures", params={"error": "timeout"}, headers=admin)
        ).json()
        assert listed["failures"][0]["retried_as"] == again["id"]
        # Not the default tenant's task; and a task still running cannot be retried.
        assert (await client.post(retry, json={}, headers=admin)).status_code == 404
        r = await client.post(f"/v1/tasks/{again['id']}/retry", json={}, headers=tenant)
        assert r.status_code == 409 and r.json()["error"] == "not_finished"


async def test_a_failure_whose_id_a_new_task_took_is_no_longer_listed(make_settings):
    async with api(make_settings(), dispatch=False) as (client, worker):
        await client.post("/v1/tasks", json={**CHAT, "id": "job-1"})
        await client.delete("/v1/tasks/job-1")
        assert [f["id"] for f in (await client.get("/v1/failures")).json()["failures"]] == ["job-1"]
        await worker.redis.delete(worker.keys.task("job-1"))  # as when its record expires
        await client.post("/v1/tasks", json={**CHAT, "id": "job-1"})
        listed = (await client.get("/v1/failures")).json()
        assert listed["failures"] == [] and listed["facets"]["status"] == []
        assert await worker.redis.zcard(f"{worker.keys.base}failures") == 0


async def test_a_process_that_cannot_share_its_metrics_still_counts_them(make_settings, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    settings = make_settings(METRICS_DIR=str(blocked / "metrics"))
    async with api(settings, dispatch=False) as (client, _):
        await client.post("/v1/tasks", json=CHAT)
        scrape = samples((await client.get("/metrics")).text)
    assert (
        value(scrape, "llmworker_tasks_submitted_total", tier="free", model="fake", source="api")
        == 1
    )


async def test_static_serves_scripts_and_styles_not_the_pages_or_other_files(make_settings):
    async with api(make_settings(), dispatch=False) as (client, _):
        assert (await client.get("/static/dashboard.js")).status_code == 200
        page = await client.get("/")
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        # A page only at its own path, with its policy; of Swagger UI only what /docs loads.
        for path in (
            "/static/dashboard.html",
            "/static/docs.html",
            "/docs/assets/oauth2-redirect.html",
        ):
            assert (await client.get(path)).status_code == 404, path
        assert (await client.get("/static/dashboard.js")).headers["cache-control"] == "no-cache"


async def _status(
    client: httpx.AsyncClient, task_id: str, headers: dict[str, str], status: str
) -> bool:
    return bool(
        (await client.get(f"/v1/tasks/{task_id}", headers=headers)).json()["status"] == status
    )


@pytest.fixture
def spans() -> Any:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing.setup(None, exporter)
    yield exporter
    tracing.shutdown()


async def test_a_task_is_one_trace_from_the_submitting_request_to_its_callback(
    make_settings, spans, http
):
    receiver = Receiver()
    settings = make_settings(
        CALLBACK_SECRET=CALLBACK_SECRET, CALLBACK_ALLOWED_HOSTS="127.0.0.1", FAKE_LATENCY_MS=20
    )
    trace_id = uuid.uuid4().hex
    incoming = f"00-{trace_id}-{'ab' * 8}-01"
    async with LoopbackServer(receiver) as hook, api(settings) as (client, _):
        body = {**CHAT, "callback_url": f"{hook}/cb"}
        r = await client.post("/v1/tasks", json=body, headers={"traceparent": incoming})
        await final(client, r.json()["id"])
        await wait_until(lambda: receiver.received)
        await asyncio.sleep(0.1)
    finished = {s.name: s for s in spans.get_finished_spans()}
    assert {
        "llmworker.submit",
        "llmworker.wait",
        "llmworker.run",
        "chat fake",
        "llmworker.callback",
    } <= set(finished)
    for span in finished.values():
        assert f"{span.context.trace_id:032x}" == trace_id, span.name
    submit, run, chat = (
        finished["llmworker.submit"],
        finished["llmworker.run"],
        finished["chat fake"],
    )
    assert f"{submit.parent.span_id:016x}" == "ab" * 8
    assert run.parent.span_id == submit.context.span_id
    assert chat.parent.span_id == run.context.span_id
    assert chat.attributes["gen_ai.operation.name"] == "chat"
    assert chat.attributes["gen_ai.provider.name"] == "fake"
    assert chat.attributes["gen_ai.request.model"] == "fake"
    assert chat.attributes["gen_ai.usage.output_tokens"] > 0
    callback = finished["llmworker.callback"]
    headers, _ = receiver.received[0]
    assert headers["traceparent"].split("-")[1:3] == [trace_id, f"{callback.context.span_id:016x}"]


def test_without_an_endpoint_tracing_needs_no_opentelemetry_installed():
    # As if the otel extra were not installed: any import of it fails.
    code = """
import sys
class NoOtel:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "opentelemetry":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoOtel())
from llmworker.api import create_app
from llmworker.observe import tracing
from llmworker.settings import load_settings
app = create_app(load_settings({"REDIS_URL": "redis://127.0.0.1:1/0"}, env_file=None))
tracing.setup(None)
assert not tracing.active()
"""
    subprocess.run([sys.executable, "-c", code], check=True)
