"""The migration guide's example module (examples/career.py), loaded by a real worker
with TASK_MODULES and routed per kind and tier: a résumé summary that chains a job match."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from .conftest import free_port, llmworker_command, process
from .test_processes import wait_ready


def test_the_career_example_summarises_then_matches_on_each_kinds_route(
    redis_url: str, prefix: str, tmp_path: Path
):
    port = free_port()
    env = {
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": prefix,
        "LOG_LEVEL": "WARNING",
        "FAKE_LATENCY_MS": "50",
        "TASK_MODULES": "examples.career",
        # A second alias of the simulated model, so each kind's route is seen on the record.
        "MODEL_QUICK": "fake/quick",
        "ROUTE_RESUME_SUMMARY_PAID": "fake",
        "ROUTE_JOB_MATCH_PAID": "quick,fake",
    }
    url = f"http://127.0.0.1:{port}"
    with (
        process(llmworker_command("serve", "--port", str(port)), env, tmp_path / "serve.log"),
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        wait_ready(url)
        body = {
            "kind": "resume_summary",
            "tier": "paid",
            "user": "candidate-7",
            "input": {"resume": "Ten years of Python ...", "job": "Senior backend engineer"},
            "metadata": {"source": "test"},
        }
        summary = _final(client, client.post("/v1/tasks", json=body).json()["id"])
        assert summary["status"] == "succeeded", summary
        assert summary["model"] == "fake" and summary["result"]["summary"]
        match = _final(client, summary["result"]["match_task"])
        assert match["status"] == "succeeded", match
        assert match["kind"] == "job_match" and match["model"] == "quick"
        assert match["user"] == "candidate-7" and match["tier"] == "paid"
        assert match["idempotency_key"] == f"{summary['id']}:job_match"
        assert match["metadata"] == {"source": "test"}
        # A bad input is refused at submission, naming the field.
        bad = client.post("/v1/tasks", json={**body, "input": {"resume": ""}})
        assert bad.status_code == 422 and bad.json()["field"] == "input.resume"


def _final(client: httpx.Client, task_id: str) -> dict[str, Any]:
    for _ in range(300):
        record: dict[str, Any] = client.get(f"/v1/tasks/{task_id}").json()
        if record["status"] in ("succeeded", "failed", "cancelled"):
            return record
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} did not finish")
