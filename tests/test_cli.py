"""The command line: one line, never a traceback, for every mistake a newcomer makes;
client commands that read .env as serve does; cancel and events; help for every option."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from llmworker.cli import parser
from llmworker.errors import ConfigError
from llmworker.record import TaskSpec

from .conftest import free_port, llmworker_command, serve_api, wait_until

CHAT = {"kind": "chat", "input": {"messages": [{"role": "user", "content": "hello"}]}}
KEY = "cli-key-0123456789abcdef"


def cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LLMWORKER_", "API_KEYS"))}
    return subprocess.run(
        llmworker_command(*args),
        env={**clean, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def acli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, *args, cwd=cwd, **env)


def assert_one_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if any(w in line for w in words)]
    assert lines, result.stderr


def test_a_redis_url_without_a_scheme_is_one_line(tmp_path: Path):
    result = cli("serve", cwd=tmp_path, REDIS_URL="localhost:6379")
    assert_one_line(result, "REDIS_URL='localhost:6379' must start with redis://")
    assert len([x for x in result.stderr.splitlines() if x.startswith("  - ")]) == 1


def test_an_unreachable_redis_is_a_line_every_few_seconds_then_one_final_line(tmp_path: Path):
    closed = free_port()
    result = cli(
        "serve",
        "--port",
        str(free_port()),
        cwd=tmp_path,
        REDIS_URL=f"redis://127.0.0.1:{closed}/0",
        REDIS_CONNECT_TIMEOUT_S="2",
        LOG_FORMAT="json",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    events = [json.loads(x) for x in result.stderr.splitlines() if x.startswith("{")]
    waiting = [e for e in events if e["event"] == "redis_waiting"]
    assert 1 <= len(waiting) <= 2 and f"127.0.0.1:{closed}" in waiting[0]["redis_url"]
    final = result.stderr.splitlines()[-1]
    assert final.startswith("llmworker: Redis at REDIS_URL=") and "within 2 s" in final
    assert "REDIS_CONNECT_TIMEOUT_S" in final


async def test_a_port_in_use_is_one_line_and_no_task_is_claimed(make_settings, start_worker):
    settings = make_settings()
    worker = await start_worker(settings, dispatch=False)
    task_id, _ = await worker.admitter.submit(TaskSpec.model_validate(CHAT))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await acli(
            "serve",
            "--port",
            str(port),
            REDIS_URL=settings.redis_url or "",
            REDIS_PREFIX=settings.redis_prefix,
        )
    assert_one_line(result, f"Port {port} on 127.0.0.1 is in use")
    fields = await worker.queue.get(task_id) or {}
    assert (fields["status"], fields["attempts"]) == ("queued", "0")


def test_serving_beyond_loopback_without_keys_is_refused_in_one_line(tmp_path: Path):
    result = cli("serve", "--host", "0.0.0.0", cwd=tmp_path)
    assert_one_line(result, "API_KEYS", "HOST=0.0.0.0")


def test_a_bad_port_for_client_commands_is_one_line(tmp_path: Path):
    result = cli("status", "some-id", cwd=tmp_path, PORT="abc")
    assert_one_line(result, "PORT='abc' is not a port number")


def test_a_malformed_url_is_one_line(tmp_path: Path):
    result = cli("status", "some-id", "--url", "http://[::1", cwd=tmp_path)
    assert_one_line(result, "is not a valid URL")


def test_client_commands_read_dotenv_as_serve_does(tmp_path: Path, make_settings):
    async def run() -> None:
        settings = make_settings(API_KEYS=KEY)
        async with serve_api(settings, dispatch=False) as (client, _):
            (tmp_path / ".env").write_text(f"LLMWORKER_URL={client.base_url}\nAPI_KEYS={KEY}\n")
            result = await acli("stats", "--json", cwd=tmp_path)
            assert result.returncode == 0, result.stderr
            assert "queues" in json.loads(result.stdout)
            (tmp_path / ".env").write_text(f"LLMWORKER_URL={client.base_url}\n")
            denied = await acli("stats", cwd=tmp_path)
            assert denied.returncode == 1 and "Traceback" not in denied.stderr
            assert "--api-key or LLMWORKER_API_KEY" in denied.stderr

    asyncio.run(run())


async def test_stats_say_which_model_is_held_and_for_how_long(make_settings):
    async with serve_api(make_settings(), dispatch=False) as (client, worker):
        plain = await acli("stats", LLMWORKER_URL=str(client.base_url))
        assert plain.returncode == 0 and "held" not in plain.stdout
        await worker.queue.hold("fake", 30_000)
        held = await acli("stats", LLMWORKER_URL=str(client.base_url))
        line = next(line for line in held.stdout.splitlines() if line.startswith("model fake"))
        assert "the provider asked to wait" in line
        assert re.search(r"held (29|30)\.\d s", line), line


async def test_cancel_and_retry_from_the_command_line(make_settings):
    async with serve_api(make_settings(), dispatch=False) as (client, _):
        queued = (await client.post("/v1/tasks", json=CHAT)).json()
        cancelled = await acli("cancel", queued["id"], LLMWORKER_URL=str(client.base_url))
        assert cancelled.returncode == 0, cancelled.stderr
        assert json.loads(cancelled.stdout)["status"] == "cancelled"
        missing = await acli("cancel", "no-such-task", LLMWORKER_URL=str(client.base_url))
        assert missing.returncode == 1 and "404" in missing.stderr
        assert "Traceback" not in missing.stderr
        # A cancelled task is finished: retried, it is a new task from the same input.
        retried = await acli("retry", queued["id"], LLMWORKER_URL=str(client.base_url))
        assert retried.returncode == 0, retried.stderr
        again = json.loads(retried.stdout)
        assert again["retry_of"] == queued["id"] and again["status"] == "queued"
        busy = await acli("retry", again["id"], LLMWORKER_URL=str(client.base_url))
        assert busy.returncode == 1 and "409" in busy.stderr and "is queued" in busy.stderr


async def test_events_follow_a_task_from_the_command_line_and_resume(make_settings):
    # TOKEN_EVENTS=always: a finished task's text stays readable from its events.
    async with serve_api(make_settings(FAKE_LATENCY_MS=50, TOKEN_EVENTS="always")) as (client, _):
        url = str(client.base_url)
        first = (await client.post("/v1/tasks", json=CHAT)).json()

        async def done() -> Any:
            record = (await client.get(f"/v1/tasks/{first['id']}")).json()
            return record if record["status"] == "succeeded" else None

        await wait_until(done)
        followed = await acli("events", first["id"], LLMWORKER_URL=url)
        assert followed.returncode == 0, followed.stderr
        events = [json.loads(line) for line in followed.stdout.splitlines()]
        assert events[-1]["event"] == "record" and events[-1]["data"]["status"] == "succeeded"
        tokens = [e for e in events if e["event"] == "tokens"]
        assert tokens and tokens[0]["id"]
        # Resumed after an event: only what came after it.
        resumed = await acli("events", first["id"], "--after", tokens[0]["id"], LLMWORKER_URL=url)
        later = [json.loads(line) for line in resumed.stdout.splitlines()]
        assert [e["id"] for e in later[:-1]] == [e["id"] for e in events[:-1]][
            [e["id"] for e in events].index(tokens[0]["id"]) + 1 :
        ]


def test_every_option_has_help_and_shows_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per option: defaults are not wrapped
    root = parser({})
    subparsers = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    assert {
        "serve",
        "submit",
        "status",
        "cancel",
        "retry",
        "events",
        "stats",
        "top",
        "check",
    } <= set(subparsers.choices)
    for name, sub in subparsers.choices.items():
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.dest} has no help"
            if action.option_strings and action.default not in (None, False):
                shown = action.default if action.dest != "api_key" else "now "
                assert str(shown) in text, f"{name} {action.option_strings[0]}: no default"
    assert "(default: 1)" in subparsers.choices["serve"].format_help()


def test_publish_without_a_qstash_token_says_so(monkeypatch):
    from llmworker.client import Client

    monkeypatch.delenv("QSTASH_TOKEN", raising=False)
    with Client("http://127.0.0.1:9") as worker, pytest.raises(ConfigError) as missing:
        worker.publish("chat", CHAT["input"])
    assert "QSTASH_TOKEN" in str(missing.value)


async def test_stats_say_a_models_adaptive_cap_and_open_circuit(make_settings):
    async with serve_api(make_settings(MAX_FAKE_PAID=10), dispatch=False) as (client, worker):
        await worker.queue.adapt("paid free", [("fake", "13", "1", "0", "1", "0", "-1", "0")])
        await worker.queue.open_circuit("fake", 60_000, "provider_quota")
        shown = await acli("stats", LLMWORKER_URL=str(client.base_url))
        line = next(line for line in shown.stdout.splitlines() if line.startswith("model fake"))
        assert "adaptive cap 9 of 13" in line, line  # a 429 cut 13 to 70 %
        assert re.search(r"circuit open (59|60) s more \(provider_quota\)", line), line
