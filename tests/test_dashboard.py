"""The dashboard (GET /) in a real headless Chromium against a real ``llmworker serve``
with an API key: it asks for the key, follows tasks from waiting to done, draws the
throughput, retries a failure, streams a task's events, and fits a phone. Screenshots go
to artifacts/dashboard/ (look at them after a change to the page)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from playwright.sync_api import Browser, Page, ViewportSize, sync_playwright

from llmworker.keys import Keys

from .conftest import ROOT, installed, llmworker_command, process
from .test_processes import _redis_env, wait_ready

ARTIFACTS = ROOT / "artifacts" / "dashboard"
KEY = "dashboard-test-key-0123456789"
DESKTOP: ViewportSize = {"width": 1280, "height": 900}
PHONE: ViewportSize = {"width": 390, "height": 844}
# The page's first data call, before it has a key, is answered 401 (that is how it
# learns to ask); Chromium logs every failed load as a console error.
KEY_PROBE = "status of 401 (Unauthorized)"
WAITING = "#lanes tr[data-lane='paid|fake'] td.c-waiting"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium; CI installs it, so there its absence is a failure, not a skip."""
    executable = installed("chromium", "chromium")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def worker_url(redis_url: str, prefix: str, tmp_path: Path) -> Iterator[str]:
    """A worker with a key, the fake model slow enough to be seen waiting and running, and
    one task at a time per user."""
    env = _redis_env(
        redis_url,
        prefix,
        API_KEYS=KEY,
        FAKE_LATENCY_MS="1500",
        PRICE_FAKE="2,8",
        MAX_USER_PAID="1",
        MAX_USER_FREE="1",
        LOG_LEVEL="WARNING",
    )
    url = f"http://127.0.0.1:{env['PORT']}"
    with process(llmworker_command("serve", "--host", "127.0.0.1"), env, tmp_path / "serve.log"):
        wait_ready(url)
        yield url


class Console:
    """A page's console errors and uncaught exceptions, but the expected key probe."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", self._message)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def _message(self, message: Any) -> None:
        if message.type == "error" and KEY_PROBE not in message.text:
            self.errors.append(message.text)


def api(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)


def submit(client: httpx.Client, user: str, **extra: Any) -> str:
    body = {
        "kind": "chat",
        "input": {"messages": [{"role": "user", "content": f"hello from {user}"}]},
        "user": user,
        "tier": "paid",
        **extra,
    }
    response = client.post("/v1/tasks", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def open_with_key(page: Page, url: str) -> None:
    """Load the page, which asks for the key; enter it; wait for the data."""
    page.goto(url + "/")
    page.wait_for_selector("#auth:not([hidden])", timeout=5000)
    assert "admin key" in (page.text_content("#auth-message") or "")
    page.fill("#auth-key", KEY)
    page.press("#auth-key", "Enter")
    page.wait_for_selector("#view-dash:not([hidden])", timeout=5000)
    page.wait_for_selector("#lanes tbody tr[data-lane='paid|fake']", timeout=5000)


def lane_number(page: Page, lane: str, column: str) -> str:
    return page.text_content(f"#lanes tr[data-lane='{lane}'] td.c-{column}") or ""


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_dashboard_follows_tasks_from_waiting_to_done_and_retries_a_failure(
    browser: Browser, worker_url: str, redis_url: str, prefix: str
):
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    console = Console(page)
    open_with_key(page, worker_url)
    assert page.get_attribute("#forget", "hidden") is None, "a 'forget key' link once a key is kept"

    with api(worker_url) as client:
        # One user, one task at a time: three of the four wait.
        ids = [submit(client, "alice") for _ in range(4)]
        # The task page of the last one, in a second tab (the key is in localStorage).
        task_page = context.new_page()
        task_console = Console(task_page)
        task_page.goto(f"{worker_url}/#/tasks/{ids[-1]}")

        page.wait_for_function(
            "sel => Number(document.querySelector(sel).textContent) >= 1", arg=WAITING, timeout=5000
        )
        page.wait_for_selector("#running tbody tr[data-task-id]", timeout=8000)
        running = page.get_attribute("#running tbody tr[data-task-id]", "data-task-id")
        assert running in ids
        assert page.is_visible(f"#running tr[data-task-id='{running}'] button.cancel")

        # The task page shows the tokens while the task runs, then the final record.
        task_page.wait_for_function(
            "() => document.querySelector('#t-status').textContent === 'running'"
            " && document.querySelector('#t-output').textContent.length > 0",
            timeout=10000,
        )
        assert task_page.text_content("#t-stream") == "live"
        task_page.wait_for_function(
            "() => document.querySelector('#t-status').textContent === 'succeeded'", timeout=5000
        )
        task_page.wait_for_selector("#t-events li.ev-record", timeout=2000)
        assert "simulated reply" in (task_page.text_content("#t-output") or "")
        assert "hello from alice" in (task_page.text_content("#t-result") or "")

        # All four done: the lane is empty and the throughput counts them.
        page.wait_for_function(
            "sel => document.querySelector('#k-ok').textContent === '4'"
            " && document.querySelector(sel).textContent === '0'",
            arg=WAITING,
            timeout=6000,
        )
        assert lane_number(page, "paid|fake", "running").startswith("0/")
        bars = page.eval_on_selector_all(
            "#chart svg g[data-minute] rect.ok", "els => els.map(e => e.getBBox().height)"
        )
        assert bars and all(h > 0 for h in bars), bars

        # Today's cost per tier and model: the four runs, priced by PRICE_FAKE.
        cost_row = "#costs tr[data-lane='paid|fake'] td"
        page.wait_for_function(
            "sel => document.querySelectorAll(sel)[1]?.textContent === '4'",
            arg=cost_row,
            timeout=5000,
        )
        cells = page.eval_on_selector_all(cost_row, "tds => tds.map(td => td.textContent)")
        assert cells[4].startswith("$") and cells[4] != "$0", cells
        assert (page.text_content("#k-cost") or "").startswith("$")
        page.locator("#costs").screenshot(path=str(ARTIFACTS / "costs-today.png"))

        # A task past its timeout_s fails, shows among the failures, and is retried.
        failed = submit(client, "bob", timeout_s=0.2)
        row = f"#failures tbody tr[data-task-id='{failed}']"
        page.wait_for_selector(row, timeout=6000)
        assert page.text_content(f"{row} td.c-status") == "failed"
        models = page.eval_on_selector_all(
            "#filters [name=model] option", "os => os.map(o => o.value)"
        )
        assert "fake" in models, "the model filter offers the failures' models"
        page.click(f"{row} button.retry")
        new_id = page.text_content(f"{row} a.new-task", timeout=5000)
        assert new_id and new_id != failed
        record = client.get(f"/v1/tasks/{new_id}").json()
        assert record["retry_of"] == failed
        assert record["user"] == "bob"

        # A model its provider asked to wait says so in its lanes, with the wait.
        store = redis.Redis.from_url(redis_url)
        seconds, micros = store.time()  # type: ignore[misc]
        until = seconds * 1000 + micros // 1000 + 20_000
        store.hset(Keys(prefix).model_state("fake"), "hold", until)
        held = "#lanes tr[data-lane='paid|fake'] .held"
        page.wait_for_selector(held, timeout=5000)
        assert (page.text_content(held) or "").startswith("held ")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.locator("#lanes").screenshot(path=str(ARTIFACTS / "lanes-held.png"))
        store.hdel(Keys(prefix).model_state("fake"), "hold")
        page.wait_for_selector(held, state="detached", timeout=5000)

        # An open circuit and a cut adaptive cap show in the lane too.
        store.hset(
            Keys(prefix).model_state("fake"),
            mapping={"circuit": "open", "c_until": until, "c_code": "provider_auth", "cap": 2},
        )
        circuit = "#lanes tr[data-lane='paid|fake'] .circuit"
        page.wait_for_selector(circuit, timeout=5000)
        assert page.text_content(circuit) == "circuit open"
        assert page.text_content("#lanes tr[data-lane='paid|fake'] .capped") == "cap 2"
        page.locator("#lanes").screenshot(path=str(ARTIFACTS / "lanes-circuit.png"))
        store.delete(Keys(prefix).model_state("fake"))
        store.close()
        page.wait_for_selector(circuit, state="detached", timeout=5000)

        screenshot(page, "desktop.png")
        screenshot(task_page, "desktop-task.png")
    assert console.errors == []
    assert task_console.errors == []
    context.close()


def test_dashboard_fits_a_phone_screen_and_rides_out_a_network_loss(
    browser: Browser, worker_url: str
):
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    page = context.new_page()
    console = Console(page)
    open_with_key(page, worker_url)
    with api(worker_url) as client:
        ids = [submit(client, user) for user in ("carol", "carol", "dave")]
        failed = submit(client, "erin", timeout_s=0.2)
        page.wait_for_selector(f"#failures tbody tr[data-task-id='{failed}']", timeout=6000)
        page.wait_for_selector("#running tbody tr[data-task-id]", timeout=6000)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"the page is {width} px wide"
        screenshot(page, "phone.png")

        page.goto(f"{worker_url}/#/tasks/{ids[1]}")
        page.wait_for_function(
            "() => document.querySelector('#t-output').textContent.length > 0", timeout=8000
        )
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"the task page is {width} px wide"
        screenshot(page, "phone-task.png")
    assert console.errors == []

    # The network goes away: a banner says so, and the page keeps polling until it is back.
    page.goto(f"{worker_url}/#/")
    page.wait_for_selector("#banner", state="hidden")
    context.set_offline(True)
    page.wait_for_selector("#banner .note.error:has-text('Cannot reach the worker')", timeout=5000)
    context.set_offline(False)
    page.wait_for_selector("#banner", state="hidden", timeout=5000)
    assert (page.text_content("#live-text") or "").startswith("live")
    context.close()
