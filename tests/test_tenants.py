"""Tenants: API_KEYS entries of tenant:key, per-tenant ids and idempotency keys, admin
keys, and the tenant of QStash deliveries."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from llmworker import TaskContext
from llmworker.auth import KeyRing
from llmworker.guards import GuardPlan

from .conftest import serve_api, tasks_with, wait_until

KEY_A = "a-key-0123456789abcdef"
KEY_B = "b-key-0123456789abcdef"
KEY_DEFAULT = "d-key-0123456789abcdef"
KEY_ADMIN = "admin-key-0123456789abcdef"
CHAT: dict[str, Any] = {
    "kind": "chat",
    "input": {"messages": [{"role": "user", "content": "hello"}]},
}


def as_(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def tenant_settings(make_settings: Any, **env: Any) -> Any:
    return make_settings(
        API_KEYS=f"appA:{KEY_A},appB:{KEY_B},{KEY_DEFAULT}",
        ADMIN_KEYS=KEY_ADMIN,
        FAKE_LATENCY_MS=20,
        **env,
    )


async def test_another_tenant_gets_404_for_a_task_everywhere(make_settings):
    async with serve_api(tenant_settings(make_settings)) as (client, _):
        body = {**CHAT, "id": "shared-id", "idempotency_key": "order-1"}
        mine = await client.post("/v1/tasks", json=body, headers=as_(KEY_A))
        assert mine.status_code == 202 and mine.json()["tenant"] == "appA"
        for key in (KEY_B, KEY_DEFAULT):
            assert (await client.get("/v1/tasks/shared-id", headers=as_(key))).status_code == 404
            events = await client.get("/v1/tasks/shared-id/events", headers=as_(key))
            assert events.status_code == 404
            cancel = await client.delete("/v1/tasks/shared-id", headers=as_(key))
            assert cancel.status_code == 404
            found = await client.get(
                "/v1/tasks", params={"idempotency_key": "order-1"}, headers=as_(key)
            )
            assert found.status_code == 404
        # The owner still sees it, uncancelled.
        again = await client.get("/v1/tasks/shared-id", headers=as_(KEY_A))
        assert again.status_code == 200 and again.json()["status"] != "cancelled"


async def test_ids_and_idempotency_keys_are_per_tenant(make_settings):
    async with serve_api(tenant_settings(make_settings), dispatch=False) as (client, worker):
        body = {**CHAT, "id": "job-7", "user": "ann"}
        a = await client.post("/v1/tasks", json=body, headers=as_(KEY_A))
        b = await client.post("/v1/tasks", json={**body, "user": "bob"}, headers=as_(KEY_B))
        # The same id makes each tenant's own task, never a replay of the other's.
        assert (a.status_code, b.status_code) == (202, 202)
        assert (a.json()["user"], b.json()["user"]) == ("ann", "bob")
        assert a.json()["id"] == b.json()["id"] == "job-7"
        repeat = await client.post("/v1/tasks", json=body, headers=as_(KEY_A))
        assert repeat.status_code == 200 and repeat.json()["user"] == "ann"

        keyed = {**CHAT, "idempotency_key": "appB/k"}
        first = await client.post(
            "/v1/tasks", json={**CHAT, "idempotency_key": "k"}, headers=as_(KEY_B)
        )
        # A key that spells another tenant's stored key finds nothing of theirs.
        other = await client.post("/v1/tasks", json=keyed, headers=as_(KEY_DEFAULT))
        assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
        assert other.json()["idempotency_key"] == "appB/k"
        found = await client.get("/v1/tasks", params={"idempotency_key": "k"}, headers=as_(KEY_B))
        assert found.json()["id"] == first.json()["id"]
        assert len({a.json()["id"], first.json()["id"], other.json()["id"]}) == 3
        assert sum(n for k, n in (await worker.queue.depths()).items() if "|" not in k) == 4


async def test_admin_keys_see_every_tenant_and_tenant_keys_do_not(make_settings):
    async with serve_api(tenant_settings(make_settings), dispatch=False) as (client, _):
        task = (await client.post("/v1/tasks", json=CHAT, headers=as_(KEY_A))).json()
        assert (await client.get("/v1/stats", headers=as_(KEY_ADMIN))).status_code == 200
        for key in (KEY_A, KEY_DEFAULT):
            denied = await client.get("/v1/stats", headers=as_(key))
            assert denied.status_code == 403 and denied.json()["error"] == "forbidden"
        path = f"/v1/tasks/{task['id']}"
        seen = await client.get(path, params={"tenant": "appA"}, headers=as_(KEY_ADMIN))
        assert seen.status_code == 200 and seen.json()["tenant"] == "appA"
        # Without ?tenant= an admin key acts for the default tenant.
        assert (await client.get(path, headers=as_(KEY_ADMIN))).status_code == 404
        # A tenant key cannot borrow another tenant.
        borrowed = await client.get(path, params={"tenant": "appA"}, headers=as_(KEY_B))
        assert borrowed.status_code == 403


async def test_a_single_tenant_deployment_keeps_todays_behaviour(make_settings):
    settings = make_settings(API_KEYS=f"{KEY_DEFAULT},{KEY_B}")
    async with serve_api(settings, dispatch=False) as (client, _):
        task = (await client.post("/v1/tasks", json=CHAT, headers=as_(KEY_DEFAULT))).json()
        assert task["tenant"] == "default"
        # Both keys are one tenant: each sees the other's tasks, and the stats.
        assert (await client.get(f"/v1/tasks/{task['id']}", headers=as_(KEY_B))).status_code == 200
        assert (await client.get("/v1/stats", headers=as_(KEY_B))).status_code == 200


async def test_follow_up_tasks_belong_to_the_parents_tenant(make_settings):
    async def parent(ctx: TaskContext, input: Any) -> dict[str, Any]:
        child = await ctx.submit("chat", {"messages": [{"role": "user", "content": "more"}]})
        return {"child": child, "me": ctx.id}

    settings = tenant_settings(make_settings)
    async with serve_api(settings, tasks=tasks_with(("parent", parent))) as (client, _):
        task = (await client.post("/v1/tasks", json={"kind": "parent"}, headers=as_(KEY_A))).json()

        async def done() -> Any:
            record = (await client.get(f"/v1/tasks/{task['id']}", headers=as_(KEY_A))).json()
            return record if record["status"] == "succeeded" else None

        result = (await wait_until(done))["result"]
        assert result["me"] == task["id"]
        child = await client.get(f"/v1/tasks/{result['child']}", headers=as_(KEY_A))
        assert child.status_code == 200 and child.json()["tenant"] == "appA"
        elsewhere = await client.get(f"/v1/tasks/{result['child']}", headers=as_(KEY_B))
        assert elsewhere.status_code == 404


@pytest.mark.parametrize(
    ("api_keys", "admin_keys", "problem"),
    [
        ("short", "", "too short"),
        (f"bad name:{KEY_A}", "", "tenant 'bad name'"),
        (f"appA:{KEY_A},appB:{KEY_A}", "", "one key is listed for both"),
        (KEY_A, KEY_A, "one key is listed for both"),
    ],
)
def test_key_problems_are_one_line_each(api_keys: str, admin_keys: str, problem: str):
    _, problems = KeyRing.parse(api_keys, admin_keys)
    assert len(problems) == 1 and problem in problems[0]


async def test_qstash_deliveries_belong_to_qstash_tenant(make_settings):
    from llmworker import signature

    current = "sig_tenant_" + "c" * 20
    settings = tenant_settings(
        make_settings,
        QSTASH_CURRENT_SIGNING_KEY=current,
        QSTASH_NEXT_SIGNING_KEY="sig_tenant_" + "n" * 20,
        PUBLIC_URL="http://worker.example.com",
        QSTASH_TENANT="appB",
    )
    async with serve_api(settings, dispatch=False) as (client, _):
        body = httpx.Request("POST", "/", json=CHAT).content
        headers = {
            "Upstash-Signature": signature.sign(
                current, body, "http://worker.example.com/v1/qstash"
            ),
            "Upstash-Message-Id": "msg_tenant_1",
            "Content-Type": "application/json",
        }
        delivered = await client.post("/v1/qstash", content=body, headers=headers)
        assert delivered.status_code == 202 and delivered.json()["tenant"] == "appB"
        params = {"idempotency_key": "msg_tenant_1"}
        mine = await client.get("/v1/tasks", params=params, headers=as_(KEY_B))
        assert mine.status_code == 200 and mine.json()["id"] == delivered.json()["id"]
        theirs = await client.get("/v1/tasks", params=params, headers=as_(KEY_A))
        assert theirs.status_code == 404


async def test_each_tenants_users_have_their_own_guard(make_settings):
    """MAX_USER_FREE=1: the default user "anonymous" of one tenant does not hold back
    another tenant's "anonymous"."""
    settings = tenant_settings(make_settings, MAX_USER_FREE=1, MAX_FAKE_FREE=5)
    async with serve_api(settings, dispatch=False) as (client, worker):
        for key in (KEY_A, KEY_B):
            r = await client.post("/v1/tasks", json=CHAT, headers=as_(key))
            assert r.json()["user"] == "anonymous"
        plan = GuardPlan.from_settings(worker.settings)
        claimed = await worker.queue.claim("r1", 5, 30_000, plan)
        assert sorted(c.fields["tenant"] for c in claimed) == ["appA", "appB"]
