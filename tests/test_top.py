"""``llmworker top``: the renderer on a full stats answer and on an older worker's, one
frame from a real worker process, refreshing through an outage, and Ctrl+C."""

from __future__ import annotations

import contextlib
import io
import os
import re
import select
import signal
import subprocess
import termios
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

from llmworker.observe.top import fit, format_duration, format_wait, render, sparkline

from .conftest import free_port, llmworker_command, process
from .test_processes import wait_ready, wait_until_sync

URL = "http://127.0.0.1:8080"
ADMIN_KEY = "top-admin-key-0123456789"
APP_KEY = "top-app-key-0123456789ab"
CHAT = {"kind": "chat", "input": {"messages": [{"role": "user", "content": "hi"}]}}

OLD_STATS: dict[str, Any] = {
    "queues": {
        "paid": {"waiting": 3, "cap": 1000, "models": {"ds-chat": 3}},
        "free": {"waiting": 7, "cap": 200, "models": {"ds-chat": 5, "fake": 2}},
    },
    "running": 3,
    "callbacks_waiting": 4,
    "guards": {
        "ds-chat": {
            "tiers": {"paid": {"in_use": 2, "limit": 5}, "free": {"in_use": 1, "limit": 1}},
            "total": {"in_use": 3, "limit": 6},
        },
        "fake": {"tiers": {"paid": {"in_use": 0, "limit": 10}, "free": {"in_use": 0, "limit": 3}}},
    },
    "user_limits": {"paid": 5, "free": 1},
    "replicas_alive": 2,
    "replica": {"id": "vm:1:abc", "running": 2, "claimed_total": 10, "draining": False},
}
SUCCEEDED = [0] * 50 + [3, 5, 0, 8, 12, 20, 9, 4, 7, 2]
FAILED = [0] * 55 + [1, 0, 2, 0, 1]
FULL_STATS: dict[str, Any] = {
    **OLD_STATS,
    "now": "2026-11-29T13:30:00.123Z",
    "lanes": [
        {
            "tier": "paid",
            "model": "ds-chat",
            "waiting": 3,
            "running": 2,
            "limit": 5,
            "oldest_wait_s": 12.3,
        },
        {
            "tier": "free",
            "model": "ds-chat",
            "waiting": 5,
            "running": 1,
            "limit": 1,
            "oldest_wait_s": 185.2,
        },
        {
            "tier": "free",
            "model": "fake",
            "waiting": 2,
            "running": 0,
            "limit": 3,
            "oldest_wait_s": 3725,
        },
    ],
    "throughput": {
        "start": "2026-11-29T12:31:00Z",
        "minute_s": 60,
        "succeeded": SUCCEEDED,
        "failed": FAILED,
        "cancelled": [0] * 59 + [1],
    },
    "providers": {
        "ds-chat": {
            "window_s": 900,
            "requests": {
                "ok": 120,
                "rate_limited": 3,
                "server_error": 0,
                "timeout": 1,
                "client_error": 0,
            },
            "duration_p50_s": 4.21,
            "duration_p95_s": 11.0,
            "ttft_p50_s": 0.8,
            "ttft_p95_s": 1.93,
        },
        "fake": {"window_s": 900, "requests": {"ok": 7}, "duration_p50_s": None},
    },
    "running_tasks": [
        {
            "id": f"01JDXYZ00000000000000000{i:02d}",
            "tenant": "acme",
            "kind": "chat",
            "tier": "paid",
            "model": "ds-chat",
            "user": f"u{i}",
            "started_at": "2026-11-29T13:29:00Z",
            "attempts": 1 + i % 2,
            "run_s": 65.2 - i,
        }
        for i in range(3)
    ],
}


def text_of(renderable: Any, width: int = 120, height: int = 25, terminal: bool = False) -> str:
    out = io.StringIO()
    Console(file=out, width=width, height=height, force_terminal=terminal, color_system=None).print(
        renderable
    )
    return out.getvalue()


def line_with(text: str, *words: str) -> str:
    """The one line holding ``words`` in this order, with only blanks (or a slot bar)
    between them."""
    pattern = re.compile(r"[\s█░]+".join(re.escape(w) for w in words))
    (line,) = [line for line in text.splitlines() if pattern.search(line)]
    return line


def test_waits_durations_and_sparklines_are_formatted_compactly():
    assert [format_wait(s) for s in (0.4, 12.3, 185.2, 3725, None, "x")] == [
        "0s", "12s", "3m05s", "1h02m", "-", "-",
    ]  # fmt: skip
    assert [format_duration(s) for s in (0.8, 4.21, 11.0, 185, None)] == [
        "800ms", "4.2s", "11s", "3m05s", "-",
    ]  # fmt: skip
    assert sparkline([0, 1, 4, 8]) == " ▁▄█"
    assert sparkline([0, 1], top=100) == " ▁", "above zero is never blank"
    assert sparkline([0, 0]) == "  "


def test_a_full_stats_answer_shows_every_section():
    text = text_of(render(FULL_STATS, url=URL))
    header = text.splitlines()[0]
    local = datetime.fromisoformat(FULL_STATS["now"]).astimezone().strftime("%H:%M:%S")
    for shown in (URL, "replicas alive 2", "running 3", "callbacks waiting 4", local):
        assert shown in header
    line_with(text, "paid", "ds-chat", "3", "2/5", "12s")
    assert "████████" in line_with(text, "free", "ds-chat", "5", "1/1", "3m05s")
    line_with(text, "free", "fake", "2", "0/3", "1h02m")
    # Throughput: this minute (the last bucket), the last 60 minutes, the sparklines.
    assert "last 60 min" in text
    succeeded = line_with(text, "succeeded", "2", str(sum(SUCCEEDED)))
    assert succeeded.rstrip().endswith(sparkline(SUCCEEDED)[-10:])
    line_with(text, "failed", "1", str(sum(FAILED)))
    line_with(text, "cancelled", "1", "1")
    assert "Provider health (last 15 min)" in text
    line_with(text, "ds-chat", "120", "3", "0", "1", "0", "4.2s", "11s", "800ms", "1.9s")
    line_with(text, "fake", "7", "-", "-", "-", "-", "-", "-", "-", "-")
    assert "Running tasks (3)" in text
    for i, run in ((0, "1m05s"), (1, "1m04s"), (2, "1m03s")):
        task = (f"01JDXYZ00000000000000000{i:02d}", "acme", "chat", "paid", "ds-chat", f"u{i}")
        line_with(text, *task, str(1 + i % 2), run)


def test_an_older_workers_answer_shows_lanes_from_queues_and_guards():
    clock = datetime(2026, 1, 2, 3, 4, 5)
    text = text_of(render(OLD_STATS, url=URL, clock=clock))
    assert "replicas alive 2" in text and "callbacks waiting 4" in text and "03:04:05" in text
    line_with(text, "paid", "ds-chat", "3", "2/5", "-")
    line_with(text, "paid", "fake", "0", "0/10", "-")
    line_with(text, "free", "ds-chat", "5", "1/1", "-")
    line_with(text, "free", "fake", "2", "0/3", "-")
    for absent in ("Throughput", "Provider health", "Running tasks"):
        assert absent not in text


def test_a_worker_with_nothing_to_report_says_so():
    quiet = {**OLD_STATS, "lanes": [], "providers": {}, "running_tasks": [], "running": 0}
    text = text_of(render(quiet, url=URL))
    assert "Lanes: none reported" in text
    assert "Provider health: no provider calls recorded lately" in text
    assert "Running tasks: none" in text


@pytest.mark.parametrize(
    "stats",
    [
        {},
        {"queues": None, "guards": [], "lanes": "x", "throughput": {"succeeded": "x"}},
        {"lanes": [None, {"tier": "paid"}], "providers": {"m": None, "n": {"requests": 3}}},
        {"throughput": {"succeeded": [1, None, "x"], "minute_s": 0}, "running_tasks": [None]},
        {"now": "not a time", "replicas_alive": "many", "running_tasks": [{"run_s": True}]},
    ],
)
def test_missing_or_malformed_fields_show_as_dashes(stats: dict[str, Any]):
    text = text_of(render(stats, url=URL, error="the worker answered 503"))
    assert text.startswith("llmworker top") and "! the worker answered 503" in text


def test_running_tasks_are_cut_to_the_terminals_height():
    stats = {
        **FULL_STATS,
        "running": 40,
        "running_tasks": [
            {"id": f"task-{i:02d}", "model": "ds-chat", "run_s": 100 - i} for i in range(40)
        ],
    }
    console = Console(file=io.StringIO(), width=120, height=40, force_terminal=True)
    text = text_of(fit(console, stats, url=URL), height=40, terminal=True)
    shown = re.findall(r"task-\d\d", text)
    assert len(text.splitlines()) <= 40 and 10 < len(shown) < 40
    assert shown == [f"task-{i:02d}" for i in range(len(shown))], "longest running first"
    assert f"Running tasks ({len(shown)} of 40)" in text


@contextlib.contextmanager
def serve(redis_url: str, prefix: str, tmp_path: Path, port: int) -> Iterator[str]:
    """``llmworker serve`` on ``port`` with admin and tenant keys; tasks run a minute."""
    env = {
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": prefix,
        "PORT": str(port),
        "LOG_LEVEL": "WARNING",
        "FAKE_LATENCY_MS": "60000",
        "MAX_USER_FREE": "1",
        "SHUTDOWN_GRACE_S": "0",
        "ADMIN_KEYS": ADMIN_KEY,
        "API_KEYS": f"app:{APP_KEY}",
    }
    command = llmworker_command("serve", "--host", "127.0.0.1")
    with process(command, env, tmp_path / f"serve-{port}.log", cwd=tmp_path):
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        yield url


APP = {"Authorization": f"Bearer {APP_KEY}"}


def submit(url: str, tier: str = "paid", user: str = "u1", status: str = "running") -> str:
    """A task of the app tenant, once it is ``status``: its id."""
    answer = httpx.post(f"{url}/v1/tasks", json={**CHAT, "tier": tier, "user": user}, headers=APP)
    task_id = str(answer.json()["id"])
    wait_until_sync(
        lambda: httpx.get(f"{url}/v1/tasks/{task_id}", headers=APP).json()["status"] == status
    )
    return task_id


def top_env(**extra: str) -> dict[str, str]:
    """The environment minus what would point the client elsewhere or size its output."""
    skip = ("LLMWORKER_", "API_KEYS", "ADMIN_KEYS", "COLUMNS", "LINES", "PORT")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    return {**clean, "COLUMNS": "120", **extra}


def run_top(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        llmworker_command("top", *args),
        env=top_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_top_once_shows_the_lanes_throughput_and_running_tasks_of_a_real_worker(
    redis_url: str, prefix: str, tmp_path: Path
):
    with serve(redis_url, prefix, tmp_path, free_port()) as url:
        paid = submit(url)
        cancelled = submit(url, user="u2")
        free = submit(url, tier="free", user="w")
        submit(url, tier="free", user="w", status="queued")  # waits: one at a time for w
        httpx.delete(f"{url}/v1/tasks/{cancelled}", headers=APP).raise_for_status()
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        wait_until_sync(lambda: httpx.get(f"{url}/v1/stats", headers=admin).json()["running"] == 2)
        frame = run_top("--once", "--url", url, "--api-key", ADMIN_KEY, cwd=tmp_path)
        assert frame.returncode == 0, frame.stderr
        text = frame.stdout
        assert "replicas alive 1" in text and "running 2" in text
        line_with(text, "paid", "fake", "0", "1/10", "-")
        waited = line_with(text, "free", "fake", "1", "1/3")
        assert re.search(r"\d+s\s*$", waited), "the waiting task's wait"
        line_with(text, "cancelled", "1", "1")
        assert "Running tasks (2)" in text
        line_with(text, paid, "app", "chat", "paid", "fake", "u1", "1")
        line_with(text, free, "app", "chat", "free", "fake", "w", "1")

        for key, status in ((None, "401"), (APP_KEY, "403")):
            keyed = ["--api-key", key] if key else []
            denied = run_top("--once", "--url", url, *keyed, cwd=tmp_path)
            assert denied.returncode == 1 and not denied.stdout
            assert f"the worker answered {status}" in denied.stderr
            assert "Traceback" not in denied.stderr
    gone = run_top("--once", "--url", url, cwd=tmp_path)
    assert gone.returncode == 1 and "Traceback" not in gone.stderr
    assert gone.stderr.count("\n") == 1 and f"Cannot reach the worker at {url}" in gone.stderr


class Terminal:
    """A child on a pseudo-terminal (120x40), its own process group as a shell makes a
    foreground job (killpg is a Ctrl+C); what it writes is collected by a thread."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        master, child = os.openpty()
        termios.tcsetwinsize(child, (40, 120))
        self.proc = subprocess.Popen(
            args, stdin=child, stdout=child, stderr=child, cwd=cwd,
            env=top_env(TERM="xterm-256color"), start_new_session=True,
        )  # fmt: skip
        os.close(child)
        self.master = master
        self.output = b""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            if not select.select([self.master], [], [], 0.1)[0]:
                if self.proc.poll() is not None:
                    return
                continue
            try:
                data = os.read(self.master, 65536)
            except OSError:  # the child closed its end
                return
            if not data:
                return
            self.output += data

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def wait_for(self, needle: str, count: int = 1, after: int = 0) -> None:
        wait_until_sync(lambda: self.text[after:].count(needle) >= count, timeout_s=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.reader.join(timeout=5)
        os.close(self.master)


def test_top_refreshes_through_an_outage_and_ctrl_c_exits_0_restoring_the_terminal(
    redis_url: str, prefix: str, tmp_path: Path
):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["top", "--url", url, "--api-key", ADMIN_KEY, "--interval", "0.2"]
    terminal = Terminal(llmworker_command(*args), tmp_path)
    try:
        terminal.wait_for(f"Cannot reach the worker at {url}", count=2)
        assert terminal.proc.poll() is None, "an unreachable worker is not the end"
        with serve(redis_url, prefix, tmp_path, port):
            submit(url)
            mark = len(terminal.text)
            terminal.wait_for("running/limit", count=2, after=mark)
            os.killpg(terminal.proc.pid, signal.SIGINT)
            assert terminal.proc.wait(timeout=10) == 0
        terminal.reader.join(timeout=5)
    finally:
        terminal.close()
    text = terminal.text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    # Back from the alternate screen, with the cursor shown, as the last thing written.
    assert text.rstrip().endswith("\x1b[?25h\x1b[?1049l")


def test_top_into_a_pipe_prints_frame_after_frame_and_ctrl_c_exits_0(tmp_path: Path):
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        llmworker_command("top", "--url", url, "--interval", "0.2"),
        env=top_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        frames = errors = 0
        while frames < 2:
            line = proc.stdout.readline().decode()
            assert line, "top ended on its own"
            frames += line.startswith("llmworker top")
            errors += f"Cannot reach the worker at {url}" in line
        os.killpg(proc.pid, signal.SIGINT)
        rest = proc.stdout.read().decode()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert errors >= 1 and "Traceback" not in rest and "KeyboardInterrupt" not in rest


def test_a_held_model_is_named_with_its_wait():
    stats = {"replicas_alive": 1, "running": 0, "callbacks_waiting": 0, "held": {"ds-chat": 65.2}}
    text = text_of(render(stats, url="http://w"))
    assert "held (the provider asked to wait): ds-chat 1m05s" in text
