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


@pytest.mark.xfail(reason="outcomes recorded after a Redis outage: in progress", strict=True)
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


# Invariants today's code breaks, and the only cases allowed to break them until it is
# fixed (each has a strict xfail below, to flip when the fix lands).
NO_5XX = "no 5xx answer"
CUT_STREAMS = "no event stream that answered 200 is cut"
KNOWN_CASES = {
    NO_5XX: ("deep nesting:",),
    CUT_STREAMS: ("event ids:", "random event ids:"),
}


def test_malformed_requests_break_no_invariant_beyond_the_known_cases(malformed: Report):
    """No stray task, no callback to loopback, the worker still answers; 5xx answers and
    cut streams only for the known cases."""
    for check in malformed.failures:
        known = KNOWN_CASES.get(check.invariant, ())
        unknown = [case for case in check.cases if not case.startswith(known)]
        assert known and check.cases and not unknown, malformed.summary()


@pytest.mark.xfail(
    reason="metadata or input nested 254 levels deep or more answers 500: orjson.dumps' "
    "recursion limit in Admitter.submit is not caught (found by make chaos)",
    strict=True,
)
def test_deeply_nested_json_gets_no_5xx(malformed: Report):
    assert_held(malformed, only=NO_5XX)


@pytest.mark.xfail(
    reason="event ids Redis refuses (Unicode digits, past 2^64) pass the check and cut the "
    "stream after its 200: a 400 for bad event ids is in progress",
    strict=True,
)
def test_no_event_stream_that_answered_200_is_cut_by_a_bad_event_id(malformed: Report):
    assert_held(malformed, only=CUT_STREAMS)
