"""The README's examples, run as written. Every ```python and ```sh block is preceded by
``<!-- example: NAME -->`` (run here by the test of that name) or by
``<!-- not run: why -->``. The only change made to a block is the port: the README says
8080, the tests use a free one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from llmworker.webhooks import sign, signing_key

from .conftest import CALLBACK_SECRET, ROOT, free_port, llmworker_command, process
from .test_processes import qstash_dev, wait_ready, wait_until_sync

FENCE_RE = re.compile(r"^```(\w*)\s*$")
MARK_RE = re.compile(r"^<!-- (example: [\w-]+|not run: .+) -->$")
RUN = ("python", "sh")


@dataclass
class Block:
    lang: str
    code: str
    mark: str | None
    line: int


def blocks(path: Path = ROOT / "README.md") -> list[Block]:
    found: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = FENCE_RE.match(lines[i])
        if fence is None:
            i += 1
            continue
        start = i
        i += 1
        body: list[str] = []
        while not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        above = lines[start - 1] if start else ""
        mark = MARK_RE.match(above)
        found.append(Block(fence.group(1), "\n".join(body) + "\n", mark and mark.group(1), start))
    return found


def example(name: str, port: int | None = None) -> str:
    (block,) = [b for b in blocks() if b.mark == f"example: {name}"]
    return block.code if port is None else block.code.replace("8080", str(port))


EXAMPLES = {
    "try-it",
    "python-client",
    "verify-callback",
    "own-kind",
    "python-publish",
    "watch",
    "quotas",
}


def test_every_example_is_run_or_says_why_not():
    names = set()
    for block in blocks():
        if block.lang not in RUN:
            continue
        assert block.mark, f"README.md:{block.line + 1}: a {block.lang} block with no marker"
        if block.mark.startswith("example: "):
            names.add(block.mark.removeprefix("example: "))
    assert names == EXAMPLES


def _run(code: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_try_it_runs_as_written(tmp_path: Path):
    """``make run``, then the other shell's commands; Ctrl+C (SIGINT to the group) ends it."""
    code = example("try-it", port := free_port())
    first, rest = code.split("\n", 1)
    assert first == "make run"
    env = {
        **os.environ,
        "PORT": str(port),
        "EMBEDDED_REDIS_DIR": str(tmp_path / "redis"),
        "REDIS_URL": "",
        "FAKE_LATENCY_MS": "50",
    }
    log_path = tmp_path / "make-run.log"
    with log_path.open("wb") as log:
        make = subprocess.Popen(
            ["make", "--no-print-directory", "run"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout_s=120)
        shell = subprocess.run(
            ["bash", "-e", "-c", rest],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert shell.returncode == 0, shell.stdout + shell.stderr
        assert "simulated reply" in shell.stdout
        submitted, _ = json.JSONDecoder().raw_decode(shell.stdout[shell.stdout.index('{"id"') :])
        assert submitted["status"] == "queued" and submitted["tier"] == "paid"
        assert "replicas alive: 1" in shell.stdout
    finally:
        os.killpg(make.pid, signal.SIGINT)
        make.wait(timeout=60)
    assert "Traceback" not in log_path.read_text()


@pytest.fixture
def worker_url(redis_url: str, prefix: str, tmp_path: Path) -> Iterator[int]:
    port = free_port()
    env = {"REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "FAKE_LATENCY_MS": "50"}
    serve = llmworker_command("serve", "--port", str(port))
    with process(serve, env, tmp_path / "serve.log"):
        wait_ready(f"http://127.0.0.1:{port}")
        yield port


def test_the_watching_example_runs_as_written(worker_url: int):
    shell = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", example("watch", worker_url)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shell.returncode == 0, shell.stderr
    assert 'llmworker_queue_waiting{model="fake",tier="paid"} 0.0' in shell.stdout
    assert "/v1/tasks /v1/tasks/{id}" in shell.stdout


def test_the_quotas_example_runs_as_written(redis_url: str, prefix: str, tmp_path: Path):
    port = free_port()
    env = {
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": prefix,
        "FAKE_LATENCY_MS": "50",
        "QUOTA_FREE_TASKS_PER_DAY": "20",
        "PRICE_FAKE": "1,2",
    }
    serve = llmworker_command("serve", "--port", str(port))
    with process(serve, env, tmp_path / "serve.log"):
        wait_ready(f"http://127.0.0.1:{port}")
        bin_dir = str(Path(sys.executable).parent)
        shell = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", example("quotas", port)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"]},
        )
    assert shell.returncode == 0, shell.stdout + shell.stderr
    decoder = json.JSONDecoder()
    answers = []
    rest = shell.stdout
    while rest.startswith("{"):
        value, end = decoder.raw_decode(rest)
        answers.append(value)
        rest = rest[end:].lstrip("\n")
    set_quota, credits, task, quota = answers
    assert set_quota["day"]["limits"]["tasks"] == 100
    assert credits["applied"] is True and credits["credits"]["usd"]["balance"] == 2.5
    assert task["status"] == "queued"
    assert quota["day"]["used"]["tasks"] + quota["day"]["reserved"]["tasks"] == 1
    assert quota["month"]["limits"]["usd"] == 5
    assert "by user" in rest and "total" in rest


def test_the_python_client_example_runs_as_written(worker_url: int):
    done = _run(example("python-client", worker_url), {})
    assert done.returncode == 0, done.stderr
    assert "simulated reply" in done.stdout and "succeeded" in done.stdout


def test_the_callback_receiver_example_verifies_a_real_callback():
    namespace: dict[str, object] = {}
    os.environ.setdefault("CALLBACK_SECRET", CALLBACK_SECRET)
    secret = os.environ["CALLBACK_SECRET"]
    exec(example("verify-callback"), namespace)
    on_llm_done = namespace["on_llm_done"]
    assert callable(on_llm_done)
    body = json.dumps({"id": "t1", "status": "succeeded", "result": {"content": "hi"}}).encode()
    now = int(time.time())
    headers = {
        "webhook-id": "task_t1_succeeded",
        "webhook-timestamp": str(now),
        "webhook-signature": sign(signing_key(secret), "task_t1_succeeded", now, body),
    }
    assert on_llm_done(body, headers)["status"] == "succeeded"
    with pytest.raises(Exception, match=r"(?i)signature"):
        on_llm_done(body.replace(b"hi", b"ho"), headers)


def test_the_own_kind_example_runs_from_the_working_folder(
    redis_url: str, prefix: str, tmp_path: Path
):
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "tasks.py").write_text(example("own-kind"))
    port = free_port()
    env = {
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": prefix,
        "TASK_MODULES": "myapp.tasks",
        "FAKE_LATENCY_MS": "10",
        "PORT": str(port),
    }
    with process(llmworker_command("serve"), env, tmp_path / "serve.log", cwd=tmp_path):
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        body = {"kind": "summarize", "user": "ann", "input": {"text": "bees"}}
        task_id = httpx.post(f"{url}/v1/tasks", json=body).json()["id"]
        record = _final(url, task_id)
        assert record["status"] == "succeeded", record
        result = record["result"]
        assert isinstance(result, dict) and "bees" in result["summary"]
        follow = _final(url, result["follow_up"])
        assert (follow["status"], follow["user"]) == ("succeeded", "ann")


def _final(url: str, task_id: str) -> dict[str, object]:
    record: dict[str, object] = {}

    def ended() -> bool:
        nonlocal record
        record = httpx.get(f"{url}/v1/tasks/{task_id}").json()
        return record["status"] in ("succeeded", "failed", "cancelled")

    wait_until_sync(ended)
    return record


def test_the_publish_example_runs_through_qstash_dev(redis_url: str, prefix: str, tmp_path: Path):
    port = free_port()
    keys = {
        "QSTASH_CURRENT_SIGNING_KEY": "sig_readme_" + "c" * 20,
        "QSTASH_NEXT_SIGNING_KEY": "sig_readme_" + "n" * 20,
    }
    env = {
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": prefix,
        "PUBLIC_URL": f"http://127.0.0.1:{port}",
        "FAKE_LATENCY_MS": "20",
        **keys,
    }
    serve = llmworker_command("serve", "--port", str(port))
    with (
        qstash_dev("readme", keys, tmp_path / "qstash-dev.log") as dev_url,
        process(serve, env, tmp_path / "serve.log"),
    ):
        wait_ready(f"http://127.0.0.1:{port}")
        publisher = {
            "QSTASH_URL": dev_url,
            "QSTASH_TOKEN": "readme",
            "PUBLIC_URL": f"http://127.0.0.1:{port}",
        }
        done = _run(example("python-publish", port), publisher)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["succeeded", "True"]


def _outline(path: Path) -> tuple[list[int], list[tuple[str | None, str, str]], list[int]]:
    """A README's heading levels, code blocks (with the line above each) and table sizes."""
    lines = path.read_text().splitlines()
    levels = [len(line) - len(line.lstrip("#")) for line in lines if re.match(r"^#{1,6} ", line)]
    tables: list[int] = []
    in_table = False
    for line in lines:
        if line.startswith("|"):
            if not in_table:
                tables.append(0)
            tables[-1] += 1
        in_table = line.startswith("|")
    return levels, [(b.mark, b.lang, b.code) for b in blocks(path)], tables


def test_the_chinese_readme_has_the_same_sections_commands_and_tables():
    english, chinese = ROOT / "README.md", ROOT / "README.zh.md"
    assert english.read_text().splitlines()[0] == "[中文](README.zh.md)"
    assert chinese.read_text().splitlines()[0] == "[English](README.md)"
    en_levels, en_blocks, en_tables = _outline(english)
    zh_levels, zh_blocks, zh_tables = _outline(chinese)
    assert zh_levels == en_levels, "the same sections, in the same order and levels"
    assert zh_blocks == en_blocks, "the same commands and code, byte for byte"
    assert zh_tables == en_tables, "the same tables, row for row"
