"""What a task used and cost: tokens by type from each provider's words, the price in
force at the time of the run (genai-prices, or PRICE_<MODEL>), and an estimate for a
stream cut short."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from llmworker.errors import ConfigError
from llmworker.settings import load_settings
from llmworker.usage import Pricing, Tokens, tokens_of

from .conftest import wait_until
from .test_executor import MESSAGES, final
from .test_provider_limits import env, submit


def test_tokens_are_read_from_openais_and_deepseeks_words():
    openai = {
        "prompt_tokens": 120,
        "completion_tokens": 80,
        "prompt_tokens_details": {"cached_tokens": 100},
        "completion_tokens_details": {"reasoning_tokens": 30},
    }
    assert tokens_of(openai) == Tokens(input=120, cached_input=100, output=80, reasoning=30)
    deepseek = {"prompt_tokens": 50, "completion_tokens": 7, "prompt_cache_hit_tokens": 40}
    assert tokens_of(deepseek) == Tokens(input=50, cached_input=40, output=7)
    assert tokens_of({"prompt_tokens": "many", "completion_tokens": -1}) == Tokens()


def test_deepseeks_off_peak_price_applies_by_the_time_of_the_run():
    pricing = Pricing(load_settings({"DEEPSEEK_API_KEY": "sk-test"}, env_file=None))
    tokens = Tokens(input=1_000_000, output=1_000_000)
    # 03:00 UTC is 11:00 in Beijing; 18:00 UTC is 02:00 there, in the discount window.
    day = pricing.cost("ds-chat", tokens, datetime(2026, 11, 29, 3, tzinfo=UTC))
    night = pricing.cost("ds-chat", tokens, datetime(2026, 11, 29, 18, tzinfo=UTC))
    assert day.usd is not None and night.usd is not None
    assert night.usd == pytest.approx(day.usd / 2)
    assert day.source is not None and day.source.startswith("genai-prices ")
    # Cached input costs less than the same input read afresh.
    cached = pricing.cost("ds-chat", Tokens(input=1_000_000, cached_input=1_000_000), day_at())
    fresh = pricing.cost("ds-chat", Tokens(input=1_000_000), day_at())
    assert cached.usd is not None and fresh.usd is not None and cached.usd < fresh.usd


def day_at() -> datetime:
    return datetime(2026, 11, 29, 3, tzinfo=UTC)


def test_a_configured_price_wins_and_unknown_models_cost_null():
    settings = load_settings(
        {"DEEPSEEK_API_KEY": "sk-test", "PRICE_DS_CHAT": "1,2,0.5", "PRICE_FAKE": "0.1,0.2"},
        env_file=None,
    )
    pricing = Pricing(settings)
    cost = pricing.cost("ds-chat", Tokens(input=1000, cached_input=400, output=100))
    assert cost.usd == pytest.approx((600 * 1 + 400 * 0.5 + 100 * 2) / 1e6)
    assert cost.source == "PRICE_DS_CHAT"
    plain = load_settings(
        {"MODEL_LOCAL": "ollama/qwen", "OLLAMA_BASE_URL": "http://h/v1"}, env_file=None
    )
    unknown = Pricing(plain).cost("local", Tokens(input=10, output=10))
    assert unknown.usd is None and unknown.source is None


def test_a_bad_price_is_named():
    with pytest.raises(ConfigError, match=r"PRICE_FAKE='cheap' must be <input>,<output>"):
        load_settings({"PRICE_FAKE": "cheap"}, env_file=None)


async def test_a_finished_task_carries_its_tokens_and_cost(make_settings, start_worker, fake_llm):
    url, _fake = fake_llm
    worker = await start_worker(make_settings(**env(url, PRICE_M1="3,15")))
    record = await final(worker, await submit(worker))
    assert record["status"] == "succeeded"
    usage, cost = record["usage"], _json(record["cost"])
    assert cost["tokens"]["input"] == usage["prompt_tokens"]
    assert cost["tokens"]["output"] == usage["completion_tokens"]
    expected = (usage["prompt_tokens"] * 3 + usage["completion_tokens"] * 15) / 1e6
    assert cost["usd"] == pytest.approx(expected)
    assert cost["source"] == "PRICE_M1" and cost["estimated"] is False


async def test_a_cancelled_stream_is_charged_an_estimate_of_what_streamed(
    make_settings, start_worker, fake_llm
):
    url, fake = fake_llm
    fake.config.latency_ms = 4000
    fake.config.tokens = 40
    worker = await start_worker(make_settings(**env(url, PRICE_M1="3,15")))
    task_id = await submit(worker, input={"messages": MESSAGES, "stream": True})
    await wait_until(lambda: fake.inflight["m1"] == 1, 5)
    await wait_until(lambda: tokens_streamed(worker, task_id), 5)
    await worker.queue.cancel(task_id, 60)

    async def charged() -> dict[str, Any] | None:
        fields = await worker.queue.get(task_id)
        return _json(fields["cost"]) if fields and fields.get("cost") else None

    cost = await wait_until(charged, 5)
    assert cost["estimated"] is True
    assert 0 < cost["tokens"]["output"] < 40
    assert cost["tokens"]["input"] > 0 and cost["usd"] > 0


_followed: dict[str, Any] = {}


async def tokens_streamed(worker: Any, task_id: str) -> bool:
    """Some of the task's answer has streamed (a tokens event is in its stream). The task
    is followed as an SSE reader follows it: its run writes its text from then on."""
    if task_id not in _followed:
        _followed[task_id] = await worker.hub.follow(task_id, "0-0")
    events = await worker.redis.xrange(worker.keys.events(task_id))
    return any(fields.get("type") == "tokens" for _, fields in events)


def _json(raw: Any) -> Any:
    import orjson

    return orjson.loads(raw) if isinstance(raw, str) else raw
