"""The migration guide from the Node worker (docs/migrate-from-node-worker.md and its
Chinese twin): it covers what the original had, and what it names here exists."""

from __future__ import annotations

import re

import pytest

from llmworker.settings import Settings, load_settings

from .conftest import ROOT

GUIDES = {
    "en": ROOT / "docs" / "migrate-from-node-worker.md",
    "zh": ROOT / "docs" / "migrate-from-node-worker.zh.md",
}
# What the original worker and its producer had: every one must be said what it becomes.
ORIGINAL = (
    "MAX_DS_CHAT_PAID", "QUEUE_MAX_FREE", "USER_MAX_ACTIVE_STREAM", "WORKER_TIMEOUT_MS",
    "STREAM_FLUSH_INTERVAL_MS", "STREAM_FLUSH_SIZE", "QSTASH_WORKER_RETRIES",
    "CONCURRENCY_*_TTL_SECONDS", "UPSTASH_REDIS_REST_URL", "QSTASH_CURRENT_SIGNING_KEY",
    "/api/execute/stream", "/api/execute/batch", "token_batch", "`done`", "`error`",
)  # fmt: skip
CODE_RE = re.compile(r"`([^`]+)`")
FAMILIES = ("MAX_", "QUEUE_MAX_", "ROUTE_", "RPM_", "TPM_", "QUOTA_")


def _table(text: str, heading: str) -> list[list[str]]:
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[2:]]


@pytest.mark.parametrize("language", GUIDES)
def test_the_guide_says_what_each_thing_of_the_node_worker_becomes(language: str):
    text = GUIDES[language].read_text()
    other = "migrate-from-node-worker.md" if language == "zh" else "migrate-from-node-worker.zh.md"
    assert text.splitlines()[0].endswith(f"({other})"), "a link to the other language first"
    for name in ORIGINAL:
        assert name in text, name
    assert "examples/career.py" in text and "ctx.submit" in text


def test_both_languages_have_the_same_tables_and_settings():
    en, zh = (GUIDES[lang].read_text() for lang in ("en", "zh"))
    assert [line.count("|") for line in en.splitlines() if line.startswith("|")] == [
        line.count("|") for line in zh.splitlines() if line.startswith("|")
    ]
    assert re.findall(r"```.*?```", en, re.S) == re.findall(r"```.*?```", zh, re.S)
    assert sorted(CODE_RE.findall(en)) == sorted(CODE_RE.findall(zh))


def test_the_settings_the_guide_names_exist():
    rows = _table(GUIDES["en"].read_text(), "## Environment variables")
    declared = {name.upper() for name in Settings.model_fields}
    named = {c for row in rows for c in CODE_RE.findall(row[1]) if re.fullmatch(r"[A-Z_]+", c)}
    assert named, "the table names settings"
    for name in named:
        assert name in declared or name.startswith(FAMILIES) or name.endswith("_API_KEY"), name
    block = re.findall(r"```sh\n(.*?)```", GUIDES["en"].read_text(), re.S)[-1]
    env = {
        k: v.split("#")[0].strip() for k, v in (line.split("=", 1) for line in block.splitlines())
    }
    settings = load_settings({**env, "DEEPSEEK_API_KEY": "sk-test"}, env_file=None)
    assert settings.rates.route("resume_summary", "paid") == ("ds-reasoner", "ds-chat")
