"""``make chaos``: faults injected into real llmworker processes, and the invariants that
must hold through them.

Every scenario runs real processes on loopback (``llmworker serve`` replicas, the
``llmworker fake-llm`` provider, a Redis) and checks what a user relies on: no task lost,
no provider call over a cap, no callback missing or signed wrongly, no result paid for
twice, no 5xx for a bad request. Figures and invariants are printed as Markdown tables
and written to ``bench/chaos-results.md``; the exit status is 1 if any invariant failed.

    python -m bench.chaos                    # every scenario, full size
    python -m bench.chaos kill9 --quick      # some of them, short (what the tests run)

Scenarios: kill9 (replicas killed with SIGKILL every 2 s), redis_restart (Redis stopped
for longer than the lease while calls run), provider_errors (30 % of provider calls fail),
sigterm_drain (replicas stopped with short and long grace), malformed (bad requests,
bad headers and cut connections against a live replica).

The Redis is ``CHAOS_REDIS_URL``, else the one on 127.0.0.1:6379, else one started here
(redis_restart always starts its own). Each scenario uses a fresh key prefix and deletes
its keys afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.common import free_port, percentile
from bench.harness import (
    CALLBACK_SECRET,
    CHAT_INPUT,
    Background,
    CallbackReceiver,
    Cluster,
    Context,
    Proc,
    Records,
    Report,
    cleanup,
    distribution,
    elapsed_s,
    fake_stats,
    redis_server_binary,
    submit_tasks,
    wait_http,
    wait_redis,
    worker_env,
)
from bench.malformed import malformed

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "chaos-results.md"

KILL_EVERY_S = 2.0
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def chat_body(task_id: str, tier: str, user: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": task_id,
        "kind": "chat",
        "model": "m1",
        "tier": tier,
        "user": user,
        "input": CHAT_INPUT,
        **extra,
    }


def start_replicas(
    cluster: Cluster, env: dict[str, str], count: int, name: str = "replica"
) -> list[tuple[Proc, str]]:
    replicas = [cluster.serve(f"{name}-{i}", env) for i in range(count)]
    for proc, url in replicas:
        wait_http(f"{url}/ready", proc)
    return replicas


def submit(urls: list[str], bodies: list[dict[str, Any]]) -> None:
    asyncio.run(submit_tasks(urls, bodies))


def wait_inflight(fake_url: str, n: int, timeout_s: float = 60) -> None:
    """Until the provider holds ``n`` calls of m1 at once."""
    deadline = time.monotonic() + timeout_s
    while fake_stats(fake_url)["inflight"].get("m1", 0) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{n} calls were not in flight within {timeout_s} s")
        time.sleep(0.05)


# -- (a) kill9 -----------------------------------------------------------------------


def kill9(ctx: Context) -> Report:
    """Three replicas; every 2 s one of them is killed with SIGKILL and started again,
    while tasks with callbacks run at the caps."""
    report = Report("kill9")
    n = 100 if ctx.quick else 1000
    caps = {"MAX_M1_PAID": 6, "MAX_M1_FREE": 2, "MAX_USER_PAID": 2, "MAX_USER_FREE": 1}
    cap = caps["MAX_M1_PAID"] + caps["MAX_M1_FREE"]
    lease_s = 2
    rng = random.Random(ctx.seed)
    with CallbackReceiver() as receiver, Cluster(ctx) as cluster:
        _, fake_url = cluster.fake_llm(300)
        env = worker_env(
            ctx,
            fake_url,
            LEASE_TTL_S=lease_s,
            # The kills are far denser than real failures: a task may be hit several times.
            MAX_ATTEMPTS=50,
            CALLBACK_SECRET=CALLBACK_SECRET,
            CALLBACK_ALLOWED_HOSTS=f"127.0.0.1:{receiver.port}",
            CALLBACK_TIMEOUT_S=2,
            CALLBACK_BACKOFF_S=0.2,
            QUEUE_MAX_PAID=n,
            QUEUE_MAX_FREE=n,
            **caps,
        )
        replicas = start_replicas(cluster, env, 3)
        bodies = [
            chat_body(
                f"k{i:05d}",
                "paid" if i % 3 else "free",
                f"paid-{i % 6}" if i % 3 else f"free-{i % 4}",
                callback_url=receiver.url,
            )
            for i in range(n)
        ]
        ids = [b["id"] for b in bodies]
        urls = [url for _, url in replicas]
        with Records(ctx.redis_url, ctx.prefix) as records:
            started = time.monotonic()
            submitter = Background(lambda: asyncio.run(submit_tasks(urls, bodies)))
            kills, next_kill, next_look = 0, started + KILL_EVERY_S, started
            deadline = started + (240 if ctx.quick else 900)
            while time.monotonic() < deadline:
                now = time.monotonic()
                if now >= next_look:
                    next_look = now + 0.5
                    if submitter.done and all(
                        s in ("succeeded", "failed") for s in records.statuses(ids)
                    ):
                        break
                if now >= next_kill:
                    victim, _ = rng.choice(replicas)
                    victim.kill()
                    victim.start()
                    kills += 1
                    next_kill += KILL_EVERY_S
                time.sleep(0.05)
            wall_s = time.monotonic() - started
            submitted = submitter.result()
            rows = records.read(ids)
            callback_wait_s = receiver.wait_for(set(ids), 60 if ctx.quick else 120)
        stats = fake_stats(fake_url)
    deliveries = receiver.snapshot()
    calls = stats["calls"].get("m1", 0)
    peak = stats["max_inflight"].get("m1", 0)
    succeeded = sum(r.get("status") == "succeeded" for r in rows)
    delivered = receiver.delivered() & set(ids)
    ids_per_task: dict[str, set[str]] = {}
    for d in deliveries:
        ids_per_task.setdefault(d.task_id, set()).add(d.webhook_id)
    mixed = sorted(t for t, hooks in ids_per_task.items() if len(hooks) > 1)
    invalid = sum(not d.valid for d in deliveries)
    report.add("replicas / kill interval / lease", f"3 / {KILL_EVERY_S:g} s / {lease_s} s")
    report.add(
        "tasks",
        f"{n} (submission retries {submitted.retries}, answered 200 as known {submitted.replayed})",
    )
    report.add("succeeded", succeeded)
    report.add("lost", n - succeeded)
    report.add("kills", kills)
    report.add("provider calls", calls)
    report.add("reruns (calls - tasks)", calls - n)
    report.add("attempts per task", distribution([r.get("attempts") for r in rows]))
    report.add("max in flight / cap", f"{peak} / {cap}")
    report.add("callbacks delivered", f"{len(delivered)} / {n}")
    report.add(
        "deliveries / duplicate deliveries",
        f"{len(deliveries)} / {len(deliveries) - len({d.webhook_id for d in deliveries})}",
    )
    report.add("last callback after the last task", f"{callback_wait_s:.1f} s")
    report.add("wall time", f"{wall_s:.1f} s")
    report.check("replicas were killed while tasks ran", kills > 0 and calls > n)
    report.check("no task lost: every task succeeded", succeeded == n, _statuses(rows))
    report.check("provider calls never above the cap", peak <= cap, f"max {peak}, cap {cap}")
    report.check(
        "every task's callback delivered",
        len(delivered) == n,
        f"{n - len(delivered)} missing" if len(delivered) < n else "",
    )
    report.check(
        "one webhook id per task",
        not mixed,
        f"{len(mixed)} tasks, e.g. {mixed[:3]}" if mixed else "",
    )
    report.check("every delivery's signature verifies", invalid == 0, f"{invalid} invalid")
    return report


def _statuses(rows: list[dict[str, str]]) -> str:
    return distribution([r.get("status", "missing") for r in rows])


# -- (b) redis_restart ---------------------------------------------------------------


def redis_restart(ctx: Context) -> Report:
    """Redis (its own, append-only, fsync always) is stopped with SIGTERM for longer than
    the lease while provider calls run, some of which end during the outage, then started
    again on the same port and folder. A run that finished while Redis was away must have
    its outcome recorded when Redis returns, not run again."""
    report = Report("redis_restart")
    n = 6 if ctx.quick else 20
    lease_s, outage_s = 2.0, 5.0
    # Calls last 5 to 8 s (longer than the outage). Redis stops 3.5 s into them and is
    # back at 8.5 s, so each call ends during the outage: about half of them more than a
    # lease before Redis returns, the rest within the last lease.
    latency_ms, jitter_ms, stop_after_s = 5000, 3000, 3.5
    port = free_port()
    own = Context(f"redis://127.0.0.1:{port}/0", ctx.prefix, ctx.logs, ctx.quick, ctx.seed)
    with Cluster(ctx) as cluster:
        server = cluster.redis_server(port, ctx.logs / "redis-data")
        # Seeded: the same call lengths every run, so as many calls end early each time.
        jitter = ["--jitter-ms", str(jitter_ms), "--seed", str(ctx.seed)]
        _, fake_url = cluster.fake_llm(latency_ms, *jitter)
        httpx.post(f"{fake_url}/_fake/config", json={"record": True})
        env = worker_env(
            own, fake_url, LEASE_TTL_S=lease_s, MAX_M1_FREE=n, MAX_USER_FREE=n, QUEUE_MAX_FREE=n
        )
        replicas = start_replicas(cluster, env, 2)
        bodies = [chat_body(f"r{i:03d}", "free", f"user-{i % 3}") for i in range(n)]
        ids = [b["id"] for b in bodies]
        submit([url for _, url in replicas], bodies)
        wait_inflight(fake_url, n)
        time.sleep(stop_after_s)
        down_at = time.time()
        server.signal_term()
        redis_exit = server.wait(30)
        time.sleep(max(0.0, down_at + outage_s - time.time()))
        server.start()
        wait_redis(own.redis_url)
        up_at = time.time()
        # Calls that run again need not be slow.
        httpx.post(f"{fake_url}/_fake/config", json={"latency_ms": 200, "jitter_ms": 0})
        with Records(own.redis_url, own.prefix) as records:
            rows = records.wait_final(ids, 120)
        stats = fake_stats(fake_url)
        timeline = httpx.get(f"{fake_url}/_fake/timeline").json()
        alive = sum(proc.alive for proc, _ in replicas)
        logged = sum(proc.log_count("outcome_not_recorded") for proc, _ in replicas)
    ends = [call[1] for call in sorted(timeline, key=lambda call: call[0])[:n]]
    early = sum(down_at <= end < up_at - lease_s for end in ends)
    late = sum(up_at - lease_s <= end <= up_at for end in ends)
    after = sum(end > up_at for end in ends)
    calls = stats["calls"].get("m1", 0)
    succeeded = sum(r.get("status") == "succeeded" for r in rows)
    report.add("tasks / replicas", f"{n} / 2")
    report.add("outage / lease", f"{up_at - down_at:.1f} s / {lease_s:g} s")
    report.add("redis-server exit code on SIGTERM", redis_exit)
    report.add(
        "first calls that ended during the outage, more than a lease before its end / "
        "within the last lease / after it",
        f"{early} / {late} / {after}",
    )
    report.add("provider calls", calls)
    report.add("duplicate calls (calls - tasks)", calls - n)
    report.add("attempts per task", distribution([r.get("attempts") for r in rows]))
    report.add("runs per task", distribution([r.get("runs") for r in rows]))
    report.add("'outcome_not_recorded' log lines", logged)
    report.add("statuses", _statuses(rows))
    report.check("every task succeeded", succeeded == n, _statuses(rows))
    report.check("replicas survived the outage", alive == 2, f"{alive} of 2 running")
    report.check(
        "no duplicate provider call: calls == tasks",
        calls == n,
        f"{calls} calls for {n} tasks",
    )
    return report


# -- (c) provider_errors -------------------------------------------------------------


def provider_errors(ctx: Context) -> Report:
    """30 % of provider calls fail (15 % 429 with a short Retry-After, 15 % 500): the
    retries must carry every task to success within its deadline."""
    report = Report("provider_errors")
    n = 60 if ctx.quick else 300
    timeout_s = 60
    caps = {"MAX_M1_PAID": 8, "MAX_M1_FREE": 4, "MAX_USER_PAID": 4, "MAX_USER_FREE": 2}
    cap = caps["MAX_M1_PAID"] + caps["MAX_M1_FREE"]
    flags = ["--rate-429", "0.15", "--rate-500", "0.15", "--retry-after-s", "0.2"]
    with Cluster(ctx) as cluster:
        _, fake_url = cluster.fake_llm(100, *flags, "--seed", str(ctx.seed))
        env = worker_env(ctx, fake_url, QUEUE_MAX_PAID=n, QUEUE_MAX_FREE=n, **caps)
        replicas = start_replicas(cluster, env, 2)
        bodies = [
            chat_body(
                f"p{i:04d}",
                "paid" if i % 2 else "free",
                f"user-{i % 8}",
                timeout_s=timeout_s,
            )
            for i in range(n)
        ]
        ids = [b["id"] for b in bodies]
        started = time.monotonic()
        submit([url for _, url in replicas], bodies)
        with Records(ctx.redis_url, ctx.prefix) as records:
            rows = records.wait_final(ids, 300 if ctx.quick else 600)
        wall_s = time.monotonic() - started
        stats = fake_stats(fake_url)
        failed = [r for r in rows if r.get("status") != "succeeded"]
        errors_first = ""
        if failed:
            with httpx.Client(timeout=10) as client:
                record = client.get(f"{replicas[0][1]}/v1/tasks/{ids[rows.index(failed[0])]}")
                errors_first = str(record.json().get("error"))[:200]
    calls = stats["calls"].get("m1", 0)
    errors = stats["errors"].get("m1", 0)
    task_s = elapsed_s(rows, "created_at", "finished_at")
    run_s = elapsed_s(rows, "started_at", "finished_at")
    peak = stats["max_inflight"].get("m1", 0)
    report.add("tasks / replicas", f"{n} / 2")
    report.add("provider calls", calls)
    report.add("errors injected", f"{errors} ({errors / max(1, calls):.0%} of calls)")
    report.add("succeeded", n - len(failed))
    report.add(
        "task time (submitted to finished) p50 / p99 / max",
        f"{percentile(task_s, 50):.2f} / {percentile(task_s, 99):.2f} / {max(task_s, default=0):.2f} s",
    )
    report.add("longest run / deadline", f"{max(run_s, default=0):.2f} s / {timeout_s} s")
    report.add("max in flight / cap", f"{peak} / {cap}")
    report.add("wall time", f"{wall_s:.1f} s")
    report.check(
        "every task succeeded within its deadline",
        not failed and all(s <= timeout_s for s in run_s),
        f"{len(failed)} not succeeded ({_statuses(rows)}); first error: {errors_first}"
        if failed
        else "",
    )
    report.check("provider calls never above the cap", peak <= cap, f"max {peak}, cap {cap}")
    return report


# -- (d) sigterm_drain ---------------------------------------------------------------


def sigterm_drain(ctx: Context) -> Report:
    """Replicas A (SHUTDOWN_GRACE_S 0.5) and B (30) run slow calls; both get SIGTERM mid
    run. A hands its tasks back (they finish on replica C, attempts unchanged); B lets its
    runs finish within the grace (they are not run again)."""
    report = Report("sigterm_drain")
    n = 8 if ctx.quick else 24
    latency_ms = 5000
    with Cluster(ctx) as cluster:
        _, fake_url = cluster.fake_llm(latency_ms)
        base = {"LEASE_TTL_S": 5, "MAX_M1_FREE": n, "MAX_USER_FREE": n, "QUEUE_MAX_FREE": n}
        # Each of A and B takes half of the tasks at most, so both hold running tasks.
        half = {**base, "WORKER_CONCURRENCY": n // 2}
        a, a_url = cluster.serve(
            "a-short-grace", worker_env(ctx, fake_url, SHUTDOWN_GRACE_S=0.5, **half)
        )
        b, b_url = cluster.serve(
            "b-long-grace", worker_env(ctx, fake_url, SHUTDOWN_GRACE_S=30, **half)
        )
        for proc, url in ((a, a_url), (b, b_url)):
            wait_http(f"{url}/ready", proc)
        bodies = [chat_body(f"s{i:03d}", "free", f"user-{i % 4}") for i in range(n)]
        ids = [x["id"] for x in bodies]
        submit([a_url, b_url], bodies)
        wait_inflight(fake_url, n)
        with Records(ctx.redis_url, ctx.prefix) as records:
            holders = [_pid(r.get("holder", "")) for r in records.read(ids)]
            on_a = [i for i, pid in zip(ids, holders, strict=True) if pid == a.pid]
            on_b = [i for i, pid in zip(ids, holders, strict=True) if pid == b.pid]
            # The survivor, started once every task runs on A or B.
            c, c_url = cluster.serve("c-survivor", worker_env(ctx, fake_url, **base))
            wait_http(f"{c_url}/ready", c)
            if fake_stats(fake_url)["inflight"].get("m1", 0) < n:
                raise RuntimeError("the calls ended before SIGTERM: C took too long to start")
            a.signal_term()
            a_sent = time.monotonic()
            time.sleep(0.3)
            b.signal_term()
            b_sent = time.monotonic()
            a_exit = a.wait(60)
            a_took = time.monotonic() - a_sent
            httpx.post(f"{fake_url}/_fake/config", json={"latency_ms": 300})
            b_exit = b.wait(90)
            b_took = time.monotonic() - b_sent
            rows = records.wait_final(ids, 120)
        stats = fake_stats(fake_url)
        tracebacks = a.log_count("Traceback") + b.log_count("Traceback")
    by_id = dict(zip(ids, rows, strict=True))
    calls = stats["calls"].get("m1", 0)
    succeeded = sum(r.get("status") == "succeeded" for r in rows)
    a_rows = [by_id[i] for i in on_a]
    b_rows = [by_id[i] for i in on_b]
    a_ok = all(r.get("attempts") == "1" and _pid(r.get("holder", "")) == c.pid for r in a_rows)
    b_ok = all(r.get("runs") == "1" for r in b_rows)
    expected_calls = n + len(on_a)
    clean = (0, -15)  # uvicorn may re-raise SIGTERM after its shutdown
    report.add("tasks / call length", f"{n} / {latency_ms / 1000:g} s")
    report.add("tasks running on A (grace 0.5 s) / B (grace 30 s)", f"{len(on_a)} / {len(on_b)}")
    report.add("A: exit code / exit after SIGTERM", f"{a_exit} / {a_took:.1f} s")
    report.add("B: exit code / exit after SIGTERM", f"{b_exit} / {b_took:.1f} s")
    report.add(
        "A's tasks: attempts / runs",
        f"{distribution([r.get('attempts') for r in a_rows])} / {distribution([r.get('runs') for r in a_rows])}",
    )
    report.add(
        "B's tasks: attempts / runs",
        f"{distribution([r.get('attempts') for r in b_rows])} / {distribution([r.get('runs') for r in b_rows])}",
    )
    report.add("provider calls (expected tasks + A's)", f"{calls} ({expected_calls})")
    report.add("tracebacks in A's and B's logs", tracebacks)
    report.check(
        "both replicas ran tasks", bool(on_a) and bool(on_b) and len(on_a) + len(on_b) == n
    )
    report.check(
        "A and B exit cleanly", a_exit in clean and b_exit in clean, f"A {a_exit}, B {b_exit}"
    )
    report.check("no task lost: every task succeeded", succeeded == n, _statuses(rows))
    report.check(
        "A's handed-back tasks finished on C with attempts unchanged",
        a_ok,
        "" if a_ok else str([(r.get("attempts"), r.get("runs"), r.get("holder")) for r in a_rows]),
    )
    report.check("B's tasks finished in its grace and were not run again", b_ok)
    report.check(
        "provider calls == tasks + A's interrupted calls",
        calls == expected_calls,
        f"{calls} calls, expected {expected_calls}",
    )
    return report


def _pid(holder: str) -> int:
    """The process id in a replica id (``host:pid:random``)."""
    parts = holder.split(":")
    return int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else -1


# -- running them --------------------------------------------------------------------

SCENARIOS: dict[str, Callable[[Context], Report]] = {
    "kill9": kill9,
    "redis_restart": redis_restart,
    "provider_errors": provider_errors,
    "sigterm_drain": sigterm_drain,
    "malformed": malformed,
}


def run_scenario(name: str, ctx: Context) -> Report:
    """Run one scenario; an error that stops it is reported as a failed invariant."""
    print(f"{name}{' (quick)' if ctx.quick else ''}", flush=True)
    started = time.monotonic()
    try:
        report = SCENARIOS[name](ctx)
    except Exception as exc:
        traceback.print_exc()
        report = Report(name)
        report.check("the scenario ran to its end", False, f"{type(exc).__name__}: {exc}")
    report.add("scenario time", f"{time.monotonic() - started:.0f} s")
    return report


@contextlib.contextmanager
def suite_redis() -> Iterator[str]:
    """CHAOS_REDIS_URL, else the Redis on 127.0.0.1:6379, else one started here."""
    url = os.environ.get("CHAOS_REDIS_URL", "redis://127.0.0.1:6379/0")
    with contextlib.suppress(redis.RedisError):
        if redis.Redis.from_url(url, socket_timeout=1).ping():
            yield url
            return
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="llmworker-chaos-redis-") as tmp:
        proc = Proc(
            "redis",
            [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
            {},
            Path(tmp),
        )
        proc.start()
        try:
            url = f"redis://127.0.0.1:{port}/0"
            wait_redis(url)
            yield url
        finally:
            proc.stop()


def markdown(reports: list[Report], quick: bool, took_s: float) -> str:
    size = "quick" if quick else "full"
    lines = [
        f"`python -m bench.chaos{' --quick' if quick else ''}` on {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{os.cpu_count()} cores, {size} size, {took_s:.0f} s in all.",
        "",
        "| scenario | figure | value |",
        "|---|---|---|",
    ]
    for r in reports:
        lines += [f"| {r.scenario} | {name} | {_cell(value)} |" for name, value in r.figures]
    lines += ["", "| scenario | invariant | result |", "|---|---|---|"]
    for r in reports:
        for c in r.checks:
            result = "ok" if c.ok else "**FAIL**" + (f": {_cell(c.detail)}" if c.detail else "")
            lines.append(f"| {r.scenario} | {_cell(c.invariant)} | {result} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text for a Markdown table cell: pipes escaped, control characters as escapes."""
    text = CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text.replace("|", "\\|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "scenarios", nargs="*", help=f"some of: {', '.join(SCENARIOS)} (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="the short version of each")
    parser.add_argument("--seed", type=int, default=Context.seed, help="for every random choice")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    args = parser.parse_args(argv)
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    started = time.monotonic()
    reports = []
    with suite_redis() as url, contextlib.ExitStack() as stack:
        if args.keep_logs:
            logs = Path(tempfile.mkdtemp(prefix="llmworker-chaos-"))
            print(f"logs in {logs}", flush=True)
        else:
            logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llmworker-chaos-")))
        for name in args.scenarios or SCENARIOS:
            prefix = f"chaos-{name}-{uuid.uuid4().hex[:8]}"
            folder = logs / name
            folder.mkdir()
            try:
                reports.append(
                    run_scenario(name, Context(url, prefix, folder, args.quick, args.seed))
                )
            finally:
                with contextlib.suppress(redis.RedisError):
                    cleanup(url, prefix)
    table = markdown(reports, args.quick, time.monotonic() - started)
    RESULTS.write_text(table)
    print("\n" + table)
    failed = [f"{r.scenario}: {c.invariant}" for r in reports for c in r.failures]
    if failed:
        print("failed invariants:\n  " + "\n  ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
