"""Whole processes: two ``llmworker serve`` replicas sharing one Redis in front of the
``llmworker fake-llm`` provider, the embedded Redis, and the command line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import free_port, llmworker_command, process


def wait_ready(url: str, path: str = "/ready", timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + path, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready within {timeout_s} s")


@contextlib.contextmanager
def qstash_dev(token: str, keys: dict[str, str], log: Path) -> Iterator[str]:
    """``llmworker qstash-dev`` signing with ``keys`` and taking ``token``, answering; its URL."""
    port = free_port()
    command = llmworker_command("qstash-dev", "--port", str(port), "--token", token)
    with process(command, keys, log):
        url = f"http://127.0.0.1:{port}"
        wait_until_sync(lambda: httpx.get(f"{url}/v2/dlq").status_code == 401)
        yield url


def wait_until_sync(predicate: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout_s} s")


def test_two_replicas_share_the_caps_and_every_task_succeeds(
    redis_url: str, prefix: str, tmp_path: Path
):
    fake_port, ports = free_port(), [free_port(), free_port()]
    fake_url = f"http://127.0.0.1:{fake_port}"
    env = {
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": prefix,
        "LOG_LEVEL": "WARNING",
        "FAKEAI_BASE_URL": f"{fake_url}/v1",
        "MODEL_M1": "fakeai/m1",
        "MODEL_M2": "fakeai/m2",
        "MAX_M1_PAID": "3",
        "MAX_M1_FREE": "0",
        "MAX_M2_FREE": "2",
        "MAX_M2_PAID": "0",
        "MAX_USER_PAID": "2",
        "MAX_USER_FREE": "1",
        "LEASE_TTL_S": "5",
    }
    fake_cmd = llmworker_command(
        "fake-llm", "--port", str(fake_port), "--latency-ms", "80", "--tokens", "4"
    )
    with (
        process(fake_cmd, env, tmp_path / "fake.log"),
        process(
            llmworker_command("serve", "--host", "127.0.0.1", "--port", str(ports[0])),
            env,
            tmp_path / "a.log",
        ),
        process(
            llmworker_command("serve", "--host", "127.0.0.1", "--port", str(ports[1])),
            env,
            tmp_path / "b.log",
        ),
    ):
        wait_ready(fake_url, "/_fake/stats")
        replicas = [f"http://127.0.0.1:{p}" for p in ports]
        for url in replicas:
            wait_ready(url)
        ids = []
        with httpx.Client(timeout=10) as client:
            for i in range(48):
                paid = i % 2 == 0
                body = {
                    "kind": "chat",
                    "input": {"messages": [{"role": "user", "content": f"task {i}"}]},
                    "tier": "paid" if paid else "free",
                    "model": "m1" if paid else "m2",
                    "user": f"user{i % 6}",
                }
                r = client.post(f"{replicas[i % 2]}/v1/tasks", json=body)
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])
            deadline = time.monotonic() + 60
            pending = set(ids)
            while pending and time.monotonic() < deadline:
                for task_id in list(pending):
                    record = client.get(f"{replicas[0]}/v1/tasks/{task_id}").json()
                    assert record["status"] not in ("failed", "cancelled"), record
                    if record["status"] == "succeeded":
                        pending.discard(task_id)
                time.sleep(0.1)
            assert not pending, f"{len(pending)} tasks did not finish"
            stats = client.get(f"{fake_url}/_fake/stats").json()
            worker_stats = [client.get(f"{u}/v1/stats").json() for u in replicas]
    assert stats["calls"] == {"m1": 24, "m2": 24}
    # The caps held across both replicas, and were used to the full.
    assert stats["max_inflight"] == {"m1": 3, "m2": 2}
    assert all(s["replica"]["claimed_total"] > 0 for s in worker_stats)
    assert worker_stats[0]["replicas_alive"] == 2


def test_serve_without_redis_url_runs_on_the_embedded_redis(tmp_path: Path):
    port = free_port()
    env = {"REDIS_URL": "", "PORT": str(port), "FAKE_LATENCY_MS": "20", "LOG_FORMAT": "json"}
    log_path = tmp_path / "serve.log"
    serve = llmworker_command("serve", "--host", "127.0.0.1")
    with process(serve, env, log_path, cwd=tmp_path) as proc:
        wait_ready(f"http://127.0.0.1:{port}")
        result = subprocess.run(
            llmworker_command(
                "submit",
                "chat",
                "--input",
                '{"messages": [{"role": "user", "content": "hi"}]}',
                "--wait",
            ),
            env={**os.environ, **env, "LLMWORKER_URL": f"http://127.0.0.1:{port}"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        record = json.loads(result.stdout[result.stdout.index("{") :])
        assert record["status"] == "succeeded"
        assert "[running]" in result.stderr
        assert "simulated reply" in result.stdout.split("{")[0]
        check = subprocess.run(llmworker_command("check"), env={**os.environ, **env}, timeout=30)
        assert check.returncode == 0
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    # The embedded Redis stopped with it.
    from llmworker.embedded import EmbeddedRedis, _answers

    assert not _answers(EmbeddedRedis(tmp_path / ".llmworker" / "redis").socket_path)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert "embedded_redis_started" in events and "only_fake_model" in events
    assert (tmp_path / ".llmworker" / "redis" / "appendonly.aof").exists() or any(
        (tmp_path / ".llmworker" / "redis").glob("appendonlydir*")
    )


def test_a_broken_task_module_stops_start_up_with_one_line(tmp_path: Path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('no config')\n")
    env = {**os.environ, "TASK_MODULES": "broken,missing_module"}
    result = subprocess.run(
        llmworker_command("serve"),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = [x for x in result.stderr.splitlines() if x.startswith("  - ")]
    assert lines == [
        "  - TASK_MODULES: cannot import 'broken': RuntimeError: no config",
        "  - TASK_MODULES: cannot import 'missing_module': ModuleNotFoundError: No module named 'missing_module'",
    ]
    assert "Traceback" not in result.stderr


def test_check_exits_1_when_nothing_is_ready():
    env = {**os.environ, "LLMWORKER_URL": f"http://127.0.0.1:{free_port()}"}
    result = subprocess.run(
        llmworker_command("check"), env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "not ready" in result.stderr


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"MAX_DS_CHAT_PAID": "many"}, "MAX_DS_CHAT_PAID='many' is not a whole number"),
        ({"PORT": "x", "MAX_NOPE_FREE": "1"}, "MAX_NOPE_FREE matches no model alias"),
    ],
)
def test_serve_with_invalid_configuration_exits_2_with_one_line_per_problem(
    env, line, tmp_path: Path
):
    result = subprocess.run(
        llmworker_command("serve"),
        env={**os.environ, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "invalid configuration" in result.stderr
    assert line in result.stderr
    assert len([x for x in result.stderr.splitlines() if x.startswith("  - ")]) == len(env)


def _serve_env(redis_url: str, prefix: str, fake_url: str, **extra: str) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": prefix,
        "LOG_LEVEL": "WARNING",
        "FAKEAI_BASE_URL": f"{fake_url}/v1",
        "MODEL_M1": "fakeai/m1",
        "MAX_M1_FREE": "4",
        "MAX_USER_FREE": "4",
        **extra,
    }


def _submit_and_wait_running(url: str, n: int, fake_url: str) -> list[str]:
    ids = []
    with httpx.Client(timeout=10) as client:
        for i in range(n):
            body = {
                "kind": "chat",
                "model": "m1",
                "input": {"messages": [{"role": "user", "content": f"t{i}"}]},
            }
            ids.append(client.post(f"{url}/v1/tasks", json=body).json()["id"])
        deadline = time.monotonic() + 20
        while client.get(f"{fake_url}/_fake/stats").json()["inflight"].get("m1", 0) < n:
            assert time.monotonic() < deadline, "the tasks did not start"
            time.sleep(0.05)
    return ids


def _wait_final(url: str, ids: list[str], timeout_s: float = 60) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=10) as client:
        while True:
            records = [client.get(f"{url}/v1/tasks/{i}").json() for i in ids]
            if all(r["status"] in ("succeeded", "failed", "cancelled") for r in records):
                return records
            assert time.monotonic() < deadline, [r["status"] for r in records]
            time.sleep(0.1)


def _interrupt_and_resume(
    redis_url: str,
    prefix: str,
    tmp_path: Path,
    *,
    n: int,
    call_ms: int,
    stop: Callable[[subprocess.Popen[bytes], str], None],
    **env: str,
) -> list[dict[str, object]]:
    """Start ``n`` slow provider calls on one replica, ``stop`` it, then let a second
    replica (with a fast provider) finish the tasks; returns their records."""
    fake_port, ports = free_port(), [free_port(), free_port()]
    fake_url = f"http://127.0.0.1:{fake_port}"
    full_env = _serve_env(redis_url, prefix, fake_url, **env)
    fake_cmd = llmworker_command(
        "fake-llm", "--port", str(fake_port), "--latency-ms", str(call_ms), "--tokens", "3"
    )
    with process(fake_cmd, full_env, tmp_path / "fake.log"):
        wait_ready(fake_url, "/_fake/stats")
        first_cmd = llmworker_command("serve", "--host", "127.0.0.1", "--port", str(ports[0]))
        with process(first_cmd, full_env, tmp_path / "first.log") as first:
            wait_ready(f"http://127.0.0.1:{ports[0]}")
            ids = _submit_and_wait_running(f"http://127.0.0.1:{ports[0]}", n, fake_url)
            stop(first, fake_url)
        httpx.post(f"{fake_url}/_fake/config", json={"latency_ms": 50})
        second_cmd = llmworker_command("serve", "--host", "127.0.0.1", "--port", str(ports[1]))
        with process(second_cmd, full_env, tmp_path / "second.log"):
            second = f"http://127.0.0.1:{ports[1]}"
            wait_ready(second)
            return _wait_final(second, ids)


def test_a_killed_replicas_tasks_run_again_on_another_replica(
    redis_url: str, prefix: str, tmp_path: Path
):
    """kill -9 mid-run: the leases lapse, the survivor requeues and finishes every task."""

    def kill(proc: subprocess.Popen[bytes], fake_url: str) -> None:
        proc.kill()
        proc.wait()

    records = _interrupt_and_resume(
        redis_url, prefix, tmp_path, n=4, call_ms=3000, stop=kill, LEASE_TTL_S="1.5"
    )
    assert [r["status"] for r in records] == ["succeeded"] * 4
    assert [r["attempts"] for r in records] == [2] * 4


def test_sigterm_hands_running_tasks_back_and_another_replica_finishes_them(
    redis_url: str, prefix: str, tmp_path: Path
):
    def terminate(proc: subprocess.Popen[bytes], fake_url: str) -> None:
        started = time.monotonic()
        proc.terminate()
        # uvicorn re-raises the signal after its graceful shutdown: -SIGTERM is a clean exit.
        assert proc.wait(timeout=20) in (0, -15)
        # It did not wait for the 5 s calls, only for its grace period...
        assert time.monotonic() - started < 4.5
        # ...and closed its provider calls on the way out.
        assert httpx.get(f"{fake_url}/_fake/stats").json()["inflight"].get("m1", 0) == 0

    records = _interrupt_and_resume(
        redis_url, prefix, tmp_path, n=3, call_ms=5000, stop=terminate, SHUTDOWN_GRACE_S="0.5"
    )
    assert [r["status"] for r in records] == ["succeeded"] * 3
    # Handed back, not failed: the interrupted runs do not count as attempts.
    assert [r["attempts"] for r in records] == [1] * 3


def test_serve_with_several_worker_processes(redis_url: str, prefix: str, tmp_path: Path):
    port = free_port()
    env = {
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": prefix,
        "LOG_LEVEL": "WARNING",
        "FAKE_LATENCY_MS": "10",
    }
    cmd = llmworker_command("serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2")
    with process(cmd, env, tmp_path / "serve.log"):
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        with httpx.Client(timeout=10) as client:
            deadline = time.monotonic() + 20
            while client.get(f"{url}/v1/stats").json()["replicas_alive"] < 2:
                assert time.monotonic() < deadline, "both worker processes should register"
                time.sleep(0.1)
            body = {"kind": "chat", "input": {"messages": [{"role": "user", "content": "x"}]}}
            ids = [client.post(f"{url}/v1/tasks", json=body).json()["id"] for _ in range(6)]
        records = _wait_final(url, ids, timeout_s=30)
    assert {r["status"] for r in records} == {"succeeded"}


def _redis_server(port: int, data_dir: Path) -> subprocess.Popen[bytes]:
    from llmworker.embedded import redis_server_binary

    args = [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir),
    ]
    args += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            import redis as sync_redis

            if sync_redis.Redis(port=port, socket_timeout=0.5).ping():
                return proc
        except Exception:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)


def test_a_redis_outage_longer_than_the_lease_loses_nothing_and_runs_nothing_twice(
    tmp_path: Path,
):
    """Redis goes away for longer than LEASE_TTL_S while two tasks run and one waits:
    the API says 503 meanwhile, the two provider calls end during the outage, and once
    Redis is back (from its append-only file) their outcomes are recorded from the runs
    that computed them, and the waiting task runs: no task runs a second time."""
    redis_port, port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "LOG_LEVEL": "WARNING",
        "MAX_FAKE_FREE": "2",
        "MAX_USER_FREE": "3",
        "FAKE_LATENCY_MS": "2000",
        "LEASE_TTL_S": "1.5",
    }
    redis_proc = _redis_server(redis_port, tmp_path)
    serve = llmworker_command("serve", "--host", "127.0.0.1", "--port", str(port))
    try:
        with (
            process(serve, env, tmp_path / "w.log"),
            httpx.Client(base_url=url, timeout=10) as client,
        ):
            wait_ready(url)
            body = {"kind": "chat", "input": {"messages": [{"role": "user", "content": "x"}]}}
            ids = [client.post("/v1/tasks", json=body).json()["id"] for _ in range(3)]
            wait_until_sync(
                lambda: (
                    [client.get(f"/v1/tasks/{i}").json()["status"] for i in ids]
                    == ["running", "running", "queued"]
                )
            )
            redis_proc.terminate()
            redis_proc.wait()
            down = client.post("/v1/tasks", json=body)
            assert down.status_code == 503 and down.json()["error"] == "unavailable"
            assert "retry-after" in down.headers
            assert client.get("/ready").status_code == 503
            assert client.get("/health").status_code == 200
            time.sleep(4.5)  # three leases; the calls end meanwhile
            redis_proc = _redis_server(redis_port, tmp_path)
            records = _wait_final(url, ids, timeout_s=40)
            assert [r["status"] for r in records] == ["succeeded"] * 3
            # A second run would have been a second claim, and a second attempt.
            assert [r["attempts"] for r in records] == [1, 1, 1]
    finally:
        redis_proc.terminate()
        redis_proc.wait()


def test_qstash_dev_and_serve_processes_carry_a_published_task_end_to_end(
    redis_url: str, prefix: str, tmp_path: Path
):
    from qstash import QStash

    port = free_port()
    keys = {
        "QSTASH_CURRENT_SIGNING_KEY": "sig_proc_" + "a" * 24,
        "QSTASH_NEXT_SIGNING_KEY": "sig_proc_" + "b" * 24,
    }
    env = {
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": prefix,
        "PORT": str(port),
        "PUBLIC_URL": f"http://127.0.0.1:{port}",
        "FAKE_LATENCY_MS": "20",
        **keys,
    }
    serve = llmworker_command("serve", "--host", "127.0.0.1")
    with (
        qstash_dev("t0k", keys, tmp_path / "qstash-dev.log") as dev_url,
        process(serve, env, tmp_path / "serve.log"),
    ):
        wait_ready(f"http://127.0.0.1:{port}")
        sent = QStash("t0k", base_url=dev_url).message.publish_json(
            url=f"http://127.0.0.1:{port}/v1/qstash",
            body={"kind": "chat", "input": {"messages": [{"role": "user", "content": "hi"}]}},
        )
        message_id = sent.message_id  # type: ignore[union-attr]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = httpx.get(f"http://127.0.0.1:{port}/v1/stats").json()
            if found["running"] == 0 and sum(q["waiting"] for q in found["queues"].values()) == 0:
                state = httpx.get(
                    f"{dev_url}/v2/messages/{message_id}",
                    headers={"Authorization": "Bearer t0k"},
                ).json()
                if state["state"] == "DELIVERED":
                    break
            time.sleep(0.1)
        else:
            raise AssertionError((tmp_path / "qstash-dev.log").read_text())
        task_id = json.loads(state["responses"][-1]["body"])["id"]
        record = httpx.get(f"http://127.0.0.1:{port}/v1/tasks/{task_id}").json()
        deadline = time.monotonic() + 10
        while record["status"] != "succeeded" and time.monotonic() < deadline:
            time.sleep(0.1)
            record = httpx.get(f"http://127.0.0.1:{port}/v1/tasks/{task_id}").json()
        assert record["status"] == "succeeded" and record["qstash"]["message_id"] == message_id


def _redis_env(redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "PORT": str(free_port()), **extra}


def _embedded_env(port: int, **extra: str) -> dict[str, str]:
    return {"REDIS_URL": "", "PORT": str(port), "LOG_LEVEL": "INFO", **extra}


def _embedded_answers(folder: Path) -> bool:
    from llmworker.embedded import _answers, socket_path

    return _answers(socket_path((folder / ".llmworker" / "redis").resolve()))


def test_ctrl_c_drains_records_the_outcome_and_stops_the_embedded_redis_last(tmp_path: Path):
    """Ctrl+C in a terminal sends SIGINT to the whole foreground process group. The
    running task finishes and is recorded, the embedded Redis outlives serve's drain,
    and no traceback is printed; the next start finds the task done, not run again."""
    env = _embedded_env(free_port(), FAKE_LATENCY_MS="2500", SHUTDOWN_GRACE_S="20")
    with _one_running_task(tmp_path, env) as (proc, url, task_id):
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    output = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert not _embedded_answers(tmp_path), "the embedded Redis stops after its last user"
    serve = llmworker_command("serve", "--host", "127.0.0.1")
    with process(serve, env, tmp_path / "again.log", cwd=tmp_path):
        wait_ready(url)
        record = httpx.get(f"{url}/v1/tasks/{task_id}").json()
        assert (record["status"], record["attempts"]) == ("succeeded", 1)


def test_a_second_serve_in_the_same_folder_keeps_working_when_the_first_stops(tmp_path: Path):
    first_port, second_port = free_port(), free_port()
    serve = llmworker_command("serve", "--host", "127.0.0.1")
    body = {"kind": "chat", "input": {"messages": [{"role": "user", "content": "x"}]}}
    env = {"FAKE_LATENCY_MS": "20"}
    with process(serve, _embedded_env(first_port, **env), tmp_path / "a.log", cwd=tmp_path) as a:
        wait_ready(f"http://127.0.0.1:{first_port}")
        second_env = _embedded_env(second_port, **env)
        with process(serve, second_env, tmp_path / "b.log", cwd=tmp_path) as b:
            second = f"http://127.0.0.1:{second_port}"
            wait_ready(second)
            a.terminate()
            assert a.wait(timeout=30) == 0
            task_id = httpx.post(f"{second}/v1/tasks", json=body).json()["id"]
            (record,) = _wait_final(second, [task_id])
            assert record["status"] == "succeeded"
            assert _embedded_answers(tmp_path)
            b.terminate()
            assert b.wait(timeout=30) == 0
    assert not _embedded_answers(tmp_path)


def test_the_embedded_redis_does_not_outlive_a_killed_serve(tmp_path: Path):
    port = free_port()
    serve = llmworker_command("serve", "--host", "127.0.0.1")
    with process(serve, _embedded_env(port), tmp_path / "serve.log", cwd=tmp_path) as proc:
        wait_ready(f"http://127.0.0.1:{port}")
        proc.kill()
        proc.wait()
        wait_until_sync(lambda: not _embedded_answers(tmp_path), timeout_s=15)


def test_json_logs_are_one_json_event_per_line_with_one_access_line_per_request(
    redis_url: str, prefix: str, tmp_path: Path
):
    env = _redis_env(redis_url, prefix, LOG_FORMAT="json", LOG_LEVEL="INFO", FAKE_LATENCY_MS="10")
    url = f"http://127.0.0.1:{env['PORT']}"
    log_path = tmp_path / "serve.log"
    serve = llmworker_command("serve", "--host", "127.0.0.1")
    with process(serve, env, log_path) as proc:
        wait_ready(url)
        with httpx.Client(base_url=url, timeout=10) as client:
            body = {"kind": "chat", "input": {"messages": [{"role": "user", "content": "x"}]}}
            task_id = client.post("/v1/tasks", json=body).json()["id"]
            (record,) = _wait_final(url, [task_id])
            assert record["status"] == "succeeded"
            assert client.get("/nope").status_code == 404
            client.get("/health")
        proc.terminate()
        proc.wait(timeout=30)
    lines = log_path.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert any(e.get("logger", "").startswith("uvicorn") for e in events), "uvicorn's too"
    access = [e for e in events if e["event"] == "request"]
    submitted = [e for e in access if e["method"] == "POST" and e["path"] == "/v1/tasks"]
    assert len(submitted) == 1 and submitted[0]["status"] == 202
    assert submitted[0]["task_id"] == task_id and isinstance(submitted[0]["ms"], float)
    reads = [e for e in access if e["path"] == f"/v1/tasks/{task_id}"]
    assert reads and all(e["task_id"] == task_id for e in reads)
    assert [e["status"] for e in access if e["path"] == "/nope"] == [404]
    # Probes are DEBUG lines: not at INFO.
    assert not [e for e in access if e["path"] in ("/health", "/ready")]


@contextlib.contextmanager
def _one_running_task(
    tmp_path: Path, env: dict[str, str]
) -> Iterator[tuple[subprocess.Popen[bytes], str, str]]:
    """serve (on ``env``'s PORT) as a terminal runs it, the leader of its own process
    group (killpg is a Ctrl+C), with one task running: (the process, its URL, the id)."""
    url = f"http://127.0.0.1:{env['PORT']}"
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen(
            llmworker_command("serve", "--host", "127.0.0.1"),
            env={**os.environ, **env}, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_ready(url)
        body = {"kind": "chat", "input": {"messages": [{"role": "user", "content": "x"}]}}
        task_id = httpx.post(f"{url}/v1/tasks", json=body).json()["id"]
        wait_until_sync(
            lambda: httpx.get(f"{url}/v1/tasks/{task_id}").json()["status"] == "running"
        )
        yield proc, url, task_id
    finally:
        if proc.poll() is None:
            proc.kill()


def test_stopping_ends_open_event_streams_at_once_without_tracebacks(
    redis_url: str, prefix: str, tmp_path: Path
):
    running = _one_running_task(
        tmp_path, _redis_env(redis_url, prefix, FAKE_LATENCY_MS="20000", SHUTDOWN_GRACE_S="1")
    )
    with running as (proc, url, task_id):
        with httpx.stream("GET", f"{url}/v1/tasks/{task_id}/events", timeout=30) as stream:
            lines = stream.iter_lines()
            while "running" not in next(lines):
                pass
            os.killpg(proc.pid, signal.SIGINT)
            stopped = time.monotonic()
            rest = list(lines)  # the stream ends: the server closed it
            assert time.monotonic() - stopped < 3, "the stream held the shutdown"
        assert "event: record" not in rest  # not final: the reader resumes elsewhere
        assert proc.wait(timeout=30) == 0
    output = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in output and "Exception in ASGI" not in output
    assert "graceful shutdown exceeded" not in output


@pytest.mark.parametrize("when", ["before the drain begins", "during the drain"])
def test_a_second_ctrl_c_hands_running_tasks_back_at_once(
    redis_url: str, prefix: str, tmp_path: Path, when: str
):
    running = _one_running_task(
        tmp_path, _redis_env(redis_url, prefix, FAKE_LATENCY_MS="60000", SHUTDOWN_GRACE_S="60")
    )
    with running as (proc, _url, task_id):
        os.killpg(proc.pid, signal.SIGINT)
        # Before the drain has begun, it must not be uvicorn's force-quit, which would
        # skip the drain altogether.
        mark = "Ctrl+C again" if when.startswith("before") else "draining"
        wait_until_sync(lambda: mark in (tmp_path / "serve.log").read_text())
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    output = (tmp_path / "serve.log").read_text()
    assert "handing_back_now" in output and "Traceback" not in output
    if when == "during the drain":
        assert "drain_cut_short" in output
    import redis as sync_redis

    from llmworker.keys import Keys

    client = sync_redis.Redis.from_url(redis_url, decode_responses=True)
    fields = client.hmget(Keys(prefix).task(task_id), ["status", "attempts"])
    assert fields == ["queued", "0"]


def test_a_client_following_events_rides_out_a_restart_of_the_only_replica(
    redis_url: str, prefix: str, tmp_path: Path
):
    import threading

    from llmworker.client import Client

    env = _redis_env(
        redis_url, prefix, FAKE_LATENCY_MS="6000", FAKE_TOKENS="60", SHUTDOWN_GRACE_S="0"
    )
    url = f"http://127.0.0.1:{env['PORT']}"
    serve = llmworker_command("serve", "--host", "127.0.0.1")
    seen: list[str] = []
    with Client(url) as client:
        with process(serve, env, tmp_path / "a.log") as first:
            wait_ready(url)
            task = client.submit("chat", {"messages": [{"role": "user", "content": "x"}]})

            def follow() -> None:
                for event in client.events(task["id"]):
                    seen.append(event.type)

            reader = threading.Thread(target=follow)
            reader.start()
            wait_until_sync(lambda: "tokens" in seen)
            first.terminate()
            first.wait(timeout=30)
        with process(serve, env, tmp_path / "b.log"):
            reader.join(timeout=60)
            assert not reader.is_alive()
    assert seen[-1] == "record", seen


def test_serve_starts_the_embedded_redis_again_when_its_keeper_is_killed(tmp_path: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = llmworker_command("serve", "--host", "127.0.0.1")
    body = {"kind": "chat", "input": {"messages": [{"role": "user", "content": "x"}]}}
    env = _embedded_env(port, FAKE_LATENCY_MS="10")
    with process(serve, env, tmp_path / "serve.log", cwd=tmp_path):
        wait_ready(url)
        first = httpx.post(f"{url}/v1/tasks", json=body).json()["id"]
        _wait_final(url, [first])
        time.sleep(1.2)  # the append-only file is synced every second
        keepers = subprocess.run(
            ["pgrep", "-f", f"llmworker.embedded {tmp_path}"], capture_output=True, text=True
        ).stdout.split()
        assert len(keepers) == 1
        os.kill(int(keepers[0]), signal.SIGKILL)
        wait_until_sync(lambda: httpx.get(f"{url}/ready").status_code == 503, timeout_s=10)
        wait_ready(url, timeout_s=30)
        # The data came back from the append-only file, and new tasks run.
        assert httpx.get(f"{url}/v1/tasks/{first}").json()["status"] == "succeeded"
        (record,) = _wait_final(url, [httpx.post(f"{url}/v1/tasks", json=body).json()["id"]])
        assert record["status"] == "succeeded"
