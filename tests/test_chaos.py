"""The fault-injection scenarios of ``make chaos`` (bench/chaos.py), short versions: real
``llmworker serve`` replicas, ``fake-llm`` and Redis processes on loopback, faults
injected, and each scenario's invariants asserted."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench.chaos import run_scenario
from bench.harness import Context, Report, cleanup


def quick(name: str, redis_url: str, prefix: str, tmp_path: Path) -> Report:
    report = run_scenario(name, Context(redis_url, prefix, tmp_path, quick=True))
    assert report.checks, report.summary()
    return report


def assert_held(report: Report, only: str | None = None) -> None:
    """Every invariant held (or the one named ``only``)."""
    failed = [c.invariant for c in report.failures if only in (None, c.invariant)]
    assert not failed, report.summary()


def test_replicas_killed_every_two_seconds_lose_no_task_break_no_cap_and_miss_no_callback(
    redis_url: str, prefix: str, tmp_path: Path
):
    assert_held(quick("kill9", redis_url, prefix, tmp_path))


def test_a_run_that_ends_while_redis_is_away_is_recorded_when_it_returns_not_rerun(
    redis_url: str, prefix: str, tmp_path: Path
):
    assert_held(quick("redis_restart", redis_url, prefix, tmp_path))


def test_thirty_percent_provider_errors_are_retried_until_every_task_succeeds(
    redis_url: str, prefix: str, tmp_path: Path
):
    assert_held(quick("provider_errors", redis_url, prefix, tmp_path))


def test_sigterm_hands_back_or_finishes_runs_and_the_process_exits_cleanly(
    redis_url: str, prefix: str, tmp_path: Path
):
    assert_held(quick("sigterm_drain", redis_url, prefix, tmp_path))


@pytest.fixture(scope="module")
def malformed(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Report]:
    """One run of the malformed scenario, for the tests below."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    try:
        yield quick("malformed", redis_url, prefix, tmp_path_factory.mktemp("malformed"))
    finally:
        cleanup(redis_url, prefix)


def test_malformed_requests_get_no_5xx_cut_no_stream_and_make_no_task(malformed: Report):
    """No 5xx answer, no event stream cut after its 200, no stray task, no callback to
    loopback, and the worker still answers."""
    assert_held(malformed)
