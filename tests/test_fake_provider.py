"""The fake provider behaves as real ones push back: capacity with 429s above it (GLM's
1302), per-minute request and token windows with OpenAI's headers, latency that grows
with load behind keep-alive comments, a quota that runs out, outages. Over real HTTP on
loopback."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from llmworker.fakellm import FakeConfig, FakeLLM

from .conftest import LoopbackServer, free_port, llmworker_command, process
from .test_processes import wait_ready


@pytest.fixture
async def provider() -> AsyncIterator[tuple[httpx.AsyncClient, FakeLLM]]:
    fake = FakeLLM(FakeConfig(latency_ms=300, tokens=4))
    async with (
        LoopbackServer(fake.app()) as url,
        httpx.AsyncClient(base_url=f"{url}/v1", timeout=30) as client,
    ):
        yield client, fake


def chat(model: str = "m1", stream: bool = False, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "one two three"}]}
    return {**body, "stream": stream, **extra}


async def configure(client: httpx.AsyncClient, **settings: Any) -> None:
    r = await client.post(
        str(client.base_url).rstrip("/").removesuffix("/v1") + "/_fake/config", json=settings
    )
    assert r.status_code == 200, r.text


async def test_calls_over_the_capacity_get_a_429_at_once_in_the_providers_words(provider):
    client, fake = provider
    await configure(client, capacity=2, error_style="glm")
    answers = await asyncio.gather(
        *(client.post("/chat/completions", json=chat()) for _ in range(4))
    )
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200, 200, 429, 429]
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.json()["error"]["code"] == "1302"
    assert refused.elapsed.total_seconds() < 0.25  # refused at once, not after the latency
    assert fake.max_inflight["m1"] == 2
    # Another model has its own capacity; room comes back as calls end.
    assert (await client.post("/chat/completions", json=chat("m2"))).status_code == 200
    assert (await client.post("/chat/completions", json=chat())).status_code == 200


async def test_a_requests_per_minute_window_counts_down_in_openais_headers(provider):
    client, _ = provider
    await configure(client, rpm=3, latency_ms=5)
    remaining = []
    for _ in range(3):
        r = await client.post("/chat/completions", json=chat())
        assert r.status_code == 200
        remaining.append(r.headers["x-ratelimit-remaining-requests"])
        assert r.headers["x-ratelimit-limit-requests"] == "3"
    assert remaining == ["2", "1", "0"]
    over = await client.post("/chat/completions", json=chat())
    assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limit_exceeded"
    # The window frees its oldest request a minute after it was made.
    assert 58 <= int(over.headers["retry-after"]) <= 60
    assert 57_000 <= int(over.headers["retry-after-ms"]) <= 60_000
    assert over.headers["x-ratelimit-remaining-requests"] == "0"
    assert over.headers["x-ratelimit-reset-requests"].endswith("s")


async def test_a_tokens_per_minute_window_counts_the_prompt_and_the_answer(provider):
    client, fake = provider
    # Each call: 3 prompt words + 4 tokens = 7.
    await configure(client, tpm=20, latency_ms=5, error_style="gemini")
    first = await client.post("/chat/completions", json=chat())
    assert first.headers["x-ratelimit-remaining-tokens"] == "13"
    assert (await client.post("/chat/completions", json=chat())).status_code == 200
    over = await client.post("/chat/completions", json=chat())
    assert over.status_code == 429 and over.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    # Asking for fewer tokens fits: 3 + 2 = 5 of the 6 left.
    fits = await client.post("/chat/completions", json=chat(max_tokens=2))
    assert fits.status_code == 200 and fits.headers["x-ratelimit-remaining-tokens"] == "1"
    assert fake.errors["m1"] == 1


async def test_load_holds_the_first_token_back_behind_keep_alive_comments(provider):
    client, _ = provider
    await configure(client, latency_ms=40, load_knee=1, load_ttft_ms=150, keepalive_s=0.05)

    async def first_token_s() -> tuple[float, int]:
        started = time.monotonic()
        comments = 0
        async with client.stream("POST", "/chat/completions", json=chat(stream=True)) as r:
            async for line in r.aiter_lines():
                if line.startswith(": keep-alive"):
                    comments += 1
                if line.startswith("data:") and '"content":"tok0"' in line:
                    return time.monotonic() - started, comments
        raise AssertionError("no token")

    alone, alone_comments = await first_token_s()
    loaded = await asyncio.gather(*(first_token_s() for _ in range(4)))
    assert alone < 0.1 and alone_comments == 0
    # Four at once, knee 1: up to 3 x 150 ms more before the first token.
    slowest, comments = max(loaded)
    assert slowest > 0.35 and comments >= 4


async def test_an_exhausted_quota_refuses_every_call_until_reset(provider):
    client, _ = provider
    await configure(client, quota_tokens=10, latency_ms=5)
    assert (await client.post("/chat/completions", json=chat())).status_code == 200
    assert (await client.post("/chat/completions", json=chat())).status_code == 200
    out = await client.post("/chat/completions", json=chat("m2"))
    assert out.status_code == 429 and out.json()["error"]["code"] == "insufficient_quota"
    await configure(client, quota_status=402)
    assert (await client.post("/chat/completions", json=chat())).status_code == 402
    await client.post(str(client.base_url).rstrip("/").removesuffix("/v1") + "/_fake/reset")
    assert (await client.post("/chat/completions", json=chat())).status_code == 200


async def test_a_model_that_is_down_answers_503_and_a_scripted_outage_ends(provider):
    client, _ = provider
    await configure(client, down=["m1"], latency_ms=5)
    assert (await client.post("/chat/completions", json=chat())).status_code == 503
    assert (await client.post("/chat/completions", json=chat("m2"))).status_code == 200
    await configure(client, down=[], outage_after_s=0.2, outage_for_s=0.3)
    assert (await client.post("/chat/completions", json=chat())).status_code == 200
    await asyncio.sleep(0.25)
    assert (await client.post("/chat/completions", json=chat("m2"))).status_code == 503
    await asyncio.sleep(0.3)
    assert (await client.post("/chat/completions", json=chat())).status_code == 200


def test_the_command_line_takes_the_shapes_and_refuses_bad_values(tmp_path):
    port = free_port()
    command = llmworker_command(
        "fake-llm", "--port", str(port), "--capacity", "1", "--error-style", "glm",
        "--latency-ms", "300",
    )  # fmt: skip
    with process(command, {}, tmp_path / "fake.log"):
        wait_ready(f"http://127.0.0.1:{port}", path="/_fake/stats")

        async def two() -> list[int]:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/v1") as c:
                answers = await asyncio.gather(
                    *(c.post("/chat/completions", json=chat()) for _ in range(2))
                )
            return sorted(r.status_code for r in answers)

        assert asyncio.run(two()) == [200, 429]
    bad = subprocess.run(
        [sys.executable, "-m", "llmworker", "fake-llm", "--rpm", "-1"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "'-1' is not a whole number of 0 or more" in bad.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "llmworker", "fake-llm", "--context", "m1"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "'m1' must be <model>=<tokens>" in bad.stderr
    for flag in ("--load-ttft-ms", "--keepalive-s", "--outage-after-s", "--outage-for-s"):
        bad = subprocess.run(
            [sys.executable, "-m", "llmworker", "fake-llm", flag, "-5"],
            capture_output=True,
            text=True,
        )
        assert bad.returncode == 2 and "is not a finite number of 0 or more" in bad.stderr, flag


async def test_a_prompt_past_a_models_context_gets_openais_400(provider):
    client, _fake = provider
    await configure(client, context={"m1": 6})
    refused = await client.post("/chat/completions", json=chat(max_tokens=4))  # 3 + 4 > 6
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "maximum context length is 6 tokens" in error["message"]
    assert (await client.post("/chat/completions", json=chat(max_tokens=3))).status_code == 200
    assert (
        await client.post("/chat/completions", json=chat("m2", max_tokens=4))
    ).status_code == 200


async def test_the_timeline_says_when_the_first_content_went_out(provider):
    client, fake = provider
    await configure(client, record=True, load_knee=1, load_ttft_ms=200)
    await asyncio.gather(
        *(client.post("/chat/completions", json=chat(stream=True)) for _ in range(2))
    )
    firsts = sorted(call[3] for call in fake.timeline)
    # 300 ms over 4 pieces: the first content after 75 ms; the second call in flight
    # waited 200 ms more.
    assert 0.05 < firsts[0] < 0.2 and 0.25 < firsts[1] < 0.45, firsts
