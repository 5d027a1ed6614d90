"""Settings: the guide's .env names, aliases by configuration, one line per problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmworker.errors import ConfigError
from llmworker.guards import GuardPlan
from llmworker.settings import load_settings

from .conftest import CALLBACK_SECRET


def test_guide_env_names_set_limits_caps_and_keys():
    s = load_settings(
        {
            "PORT": "8081",
            "MAX_DS_CHAT_PAID": "7",
            "MAX_DS_REASONER_PAID": "2",
            "MAX_GEMINI_FLASH_FREE": "4",
            "MAX_USER_FREE": "2",
            "QUEUE_MAX_PAID": "50",
            "QUEUE_MAX_FREE": "5",
            "DEEPSEEK_API_KEY": "sk-1",
            "DEEPSEEK_BASE_URL": "https://proxy.example/v1",
        },
        env_file=None,
    )
    assert s.port == 8081
    assert s.model_limit("ds-chat", "paid") == 7
    assert s.model_limit("ds-reasoner", "paid") == 2
    assert s.model_limit("gemini-flash", "free") == 4
    assert s.user_limits["free"] == 2
    assert s.queue_caps == {"paid": 50, "free": 5}
    assert s.providers["deepseek"].base_url == "https://proxy.example/v1"
    assert set(s.available_models) == {"ds-chat", "ds-reasoner", "fake"}
    assert s.fallback_model == "ds-chat"


def test_without_provider_keys_only_fake_is_available_and_default():
    s = load_settings({}, env_file=None)
    assert s.available_models == ["fake"]
    assert s.fallback_model == "fake"
    assert not s.real_models_available


def test_new_alias_and_provider_need_configuration_only():
    s = load_settings(
        {
            "OLLAMA_BASE_URL": "http://127.0.0.1:11434/v1",
            "MODEL_QWEN_LOCAL": "ollama/qwen2.5:7b",
            "MAX_QWEN_LOCAL_PAID": "1",
            "MAX_QWEN_LOCAL": "2",
        },
        env_file=None,
    )
    alias = s.models["qwen-local"]
    assert (alias.provider, alias.model) == ("ollama", "qwen2.5:7b")
    assert "qwen-local" in s.available_models  # a local endpoint needs no key
    assert s.model_limit("qwen-local", "paid") == 1
    assert s.model_total_limits == {"qwen-local": 2}


def test_custom_tiers_with_weights():
    s = load_settings(
        {
            "TIERS": "gold,silver,free",
            "TIER_WEIGHT_GOLD": "8",
            "MAX_USER_GOLD": "9",
            "QUEUE_MAX_SILVER": "3",
        },
        env_file=None,
    )
    assert s.tier_names == ["gold", "silver", "free"]
    assert (
        s.tier_weights["gold"] == 8 and s.user_limits["gold"] == 9 and s.queue_caps["silver"] == 3
    )
    plan = GuardPlan.from_settings(s)
    assert plan.ranked.split()[0] == "gold"
    assert plan.schedule.split().count("gold") == 8


def test_every_problem_is_reported_on_its_own_line():
    with pytest.raises(ConfigError) as info:
        load_settings(
            {
                "PORT": "eighty",
                "LEASE_TTL_S": "0",
                "MAX_FOO_PAID": "3",
                "MAX_USER_GOLD": "2",
                "QUEUE_MAX_FREE": "-1",
                "MAX_DS_CHAT_PAID": "lots",
                "MODEL_X": "no-slash",
                "MODEL_Y": "nowhere/model",
                "DEFAULT_TIER": "vip",
            },
            env_file=None,
        )
    problems = info.value.problems
    assert len(problems) == 9, problems
    joined = "\n".join(problems)
    for needle in (
        "PORT='eighty'",
        "LEASE_TTL_S='0'",
        "MAX_FOO_PAID matches no model alias",
        "MAX_USER_GOLD names tier 'gold'",
        "QUEUE_MAX_FREE=-1 must be at least 0",
        "MAX_DS_CHAT_PAID='lots' is not a whole number",
        "MODEL_X='no-slash' must be <provider>/<model name>",
        "MODEL_Y names provider 'nowhere'",
        "DEFAULT_TIER='vip' is not in TIERS",
    ):
        assert needle in joined


def test_default_model_needs_its_providers_key():
    with pytest.raises(ConfigError, match="DEFAULT_MODEL='gpt' needs OPENAI_API_KEY"):
        load_settings({"DEFAULT_MODEL": "gpt"}, env_file=None)


def test_dotenv_file_is_read_and_the_environment_wins(tmp_path: Path):
    env_file = tmp_path / ".env"
    env_file.write_text("MAX_DS_CHAT_PAID=4\nQUEUE_MAX_FREE=9\nDEEPSEEK_API_KEY=from-file\n")
    s = load_settings({"QUEUE_MAX_FREE": "11"}, env_file=env_file)
    assert s.model_limit("ds-chat", "paid") == 4
    assert s.queue_caps["free"] == 11
    assert s.providers["deepseek"].api_key == "from-file"


def test_redacted_settings_hide_secrets():
    env = {
        "API_KEYS": "a" * 16 + ",appB:" + "b" * 16,
        "DEEPSEEK_API_KEY": "sk-secret",
        "CALLBACK_SECRET": CALLBACK_SECRET,
        "QSTASH_TOKEN": "qstash-token",
        "QSTASH_CURRENT_SIGNING_KEY": "sig_current",
        "PUBLIC_URL": "https://worker.example.com",
    }
    s = load_settings(env, env_file=None)
    shown = repr(s.redacted())
    for secret in ("sk-secret", CALLBACK_SECRET, "qstash-token", "sig_current", "'a,b'"):
        assert secret not in shown
    assert s.redacted()["api_keys"] == 2


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"QSTASH_SKIP_VERIFY": "true"}, "QSTASH_SKIP_VERIFY=true accepts unsigned deliveries"),
        ({"CALLBACK_SECRET": "not base64!"}, "CALLBACK_SECRET: must be a Standard Webhooks secret"),
        ({"CALLBACK_SECRET": "whsec_c2hvcnQ="}, "CALLBACK_SECRET: is too short"),
        ({"CALLBACK_VIA": "qstash"}, "CALLBACK_VIA=qstash publishes callbacks through QStash"),
        ({"PUBLIC_URL": "worker.example.com"}, "PUBLIC_URL='worker.example.com' must be an http"),
        ({"QSTASH_CURRENT_SIGNING_KEY": "k"}, "QSTASH_CURRENT_SIGNING_KEY is set but PUBLIC_URL"),
        ({"CALLBACK_DEADLINE_S": "90000"}, "CALLBACK_DEADLINE_S=90000 is past RESULT_TTL_S"),
    ],
)
def test_qstash_and_callback_settings_that_cannot_work_stop_start_up(env, line):
    with pytest.raises(ConfigError) as caught:
        load_settings(env, env_file=None)
    assert any(p.startswith(line) for p in caught.value.problems), caught.value.problems


def test_skipping_qstash_verification_is_allowed_in_development():
    s = load_settings({"QSTASH_SKIP_VERIFY": "true", "LLMWORKER_ENV": "development"}, env_file=None)
    assert s.qstash_skip_verify


@pytest.mark.parametrize(
    "url",
    [
        "https://worker.example.com/api",
        "https://worker.example.com/v1/qstash",
        "https://w.example.com?x=1",
    ],
)
def test_a_public_url_with_a_path_is_refused_in_one_line(url: str):
    with pytest.raises(ConfigError) as refused:
        load_settings({"PUBLIC_URL": url}, env_file=None)
    (line,) = refused.value.problems
    assert line.startswith(f"PUBLIC_URL={url!r} must be the worker's origin only")


def test_a_public_url_may_end_in_a_slash():
    assert load_settings({"PUBLIC_URL": "https://w.example.com/"}, env_file=None).public_url


def test_rates_routes_floors_and_contexts_are_read_per_model_and_tier():
    s = load_settings(
        {
            "RPM_DS_CHAT": "60",
            "TPM_DS_CHAT_PAID": "90000",
            "MIN_DS_CHAT": "2",
            "CONTEXT_FAKE": "4096",
            "ROUTE_SUMMARY_PAID": "ds-reasoner,ds-chat",
            "DEEPSEEK_API_KEY": "sk-test",
            "SPILL_AFTER_S": "5",
        },
        env_file=None,
    )
    assert s.rates.rpm == {"ds-chat": {"": 60}}
    assert s.rates.tpm == {"ds-chat": {"paid": 90000}}
    assert s.rates.floor("ds-chat") == 2 and s.rates.floor("fake") == 1
    assert s.rates.context("fake") == 4096 and s.rates.context("ds-chat") == 128_000
    assert s.rates.route("summary", "paid") == ("ds-reasoner", "ds-chat")
    assert s.rates.route("summary", "free") is None
    args = GuardPlan.from_settings(s).limit_args
    pairs = dict(zip(args[::2], args[1::2], strict=True))
    assert pairs["r:ds-chat"] == "60" and pairs["k:ds-chat:paid"] == "90000"
    assert pairs["a"] == "1" and pairs["s"] == "5000" and pairs["w"] == "60000"


def test_bad_rates_and_routes_are_each_reported():
    with pytest.raises(ConfigError) as info:
        load_settings(
            {
                "RPM_NOPE": "5",
                "TPM_FAKE": "many",
                "MIN_FAKE": "0",
                "ROUTE_CHAT": "fake",
                "ROUTE_CHAT_PAID": "fake,nope",
                "ROUTE_CHAT_FREE": "fake,fake",
            },
            env_file=None,
        )
    joined = "\n".join(info.value.problems)
    for needle in (
        "RPM_NOPE matches no model alias",
        "TPM_FAKE='many' is not a whole number",
        "MIN_FAKE=0 must be at least 1",
        "ROUTE_CHAT must be ROUTE_<KIND>_<TIER>",
        "ROUTE_CHAT_PAID='fake,nope' must list model aliases",
        "ROUTE_CHAT_FREE='fake,fake' names a model twice",
    ):
        assert needle in joined, joined
    assert len(info.value.problems) == 6
