"""``python -m bench.peers``: the W1 saturation benchmark for llmworker and five peer task
queues (saq, dramatiq, taskiq with taskiq-redis, arq, celery), in one run, against the
same fake provider streaming the same answers.

W1: 2 worker processes, a cap of 20 concurrent provider calls in total, a provider
(``llmworker fake-llm``) that takes 100 ms per streamed call, 2,000 tasks from 64
concurrent clients. Utilisation = ideal makespan (2,000 x 0.1 s / 20 = 10 s) / (first
submission -> last completion). llmworker's figure is ``bench.run.saturation_run``'s:
its replicas share one guard on the cap. A peer has no guard across processes, so the
cap is split by hand: 2 processes of concurrency 10 (the best static split). Each peer's
task makes the same streamed call (``bench/peers/peerlib.py``) and records its finish
time in Redis; its workers run with ``.venv-peers``, made from
``bench/requirements-peers.txt`` on first use, so the peers never enter llmworker's
dependencies.

Everything runs in Redis database 15 (``BENCH_PEERS_REDIS_URL`` to change it), which
must be empty at the start and is emptied after each system. Writes
``bench/peers-results.md`` and ``docs/peers.png`` when every system ran.

    python -m bench.peers               # llmworker and the five peers
    python -m bench.peers arq celery    # some of them (printed, not written)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import orjson
import psutil
import redis

from bench.common import CHAT_INPUT, ROOT, Bench, free_port, wait_http
from bench.run import saturation_run

N, CLIENTS, CAP, LATENCY_S, TOKENS = 2000, 64, 20, 0.100, 5
PROCESSES, PER_PROCESS = 2, CAP // 2
IDEAL_S = N * LATENCY_S / CAP
TITLE = "W1 saturation: 2 processes, cap 20, 100 ms streamed calls, 2,000 tasks"

VENV = ROOT / ".venv-peers"
REQUIREMENTS = ROOT / "bench" / "requirements-peers.txt"
PEERS_DIR = ROOT / "bench" / "peers"
RESULTS = ROOT / "bench" / "peers-results.md"
CHART = ROOT / "docs" / "peers.png"

# Keys the peer tasks write (bench/peers/peerlib.py).
DONE, ERRORS, READY = "peers:done", "peers:errors", "peers:ready"

START_TIMEOUT_S = 30.0
ENQUEUE_TIMEOUT_S = 120.0
# A peer gets 6x the ideal makespan, and less if it stops finishing tasks altogether.
FINISH_TIMEOUT_S = 6 * IDEAL_S
STALL_S = 20.0
STOP_GRACE_S = 10.0


class PeerFailed(Exception):
    """A peer that did not start, enqueue or finish: its row says why."""


@dataclass(frozen=True)
class Peer:
    name: str
    package: str
    how: str
    short: str  # the chart's second line
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()

    def command(self, python: Path, index: int) -> list[str]:
        return [str(python), *(a.replace("{index}", str(index)) for a in self.args)]


P = str(PER_PROCESS)
TASKIQ = ("--workers", "1", "--max-async-tasks", P, "--log-level", "WARNING")
CELERY = ("-m", "celery", "-A", "peer_celery", "worker", "-c", P, "-n", "peer{index}@%h")
PEERS = (
    Peer(
        "saq",
        "saq",
        f"{PROCESSES} processes x concurrency {P} (asyncio, aiohttp)",
        "asyncio, 2 x 10",
        ("-m", "saq", "peer_saq.settings", "--workers", "1"),
    ),
    Peer(
        "dramatiq",
        "dramatiq",
        f"{PROCESSES} processes x {P} threads (httpx)",
        "threads, 2 x 10",
        ("-m", "dramatiq", "peer_dramatiq", "--processes", "1", "--threads", P),
    ),
    Peer(
        "taskiq",
        "taskiq",
        f"{PROCESSES} processes x max-async-tasks {P} (asyncio, aiohttp; ListQueueBroker)",
        "asyncio, 2 x 10",
        ("-m", "taskiq", "worker", "peer_taskiq:broker", *TASKIQ),
    ),
    Peer(
        "arq",
        "arq",
        f"{PROCESSES} processes x max_jobs {P} (asyncio, aiohttp; poll_delay 0.01 s)",
        "asyncio, 2 x 10, poll_delay 0.01 s",
        ("-m", "arq", "peer_arq.WorkerSettings"),
        (("PEERS_ARQ_POLL_DELAY", "0.01"),),
    ),
    Peer(
        "arq-default",
        "arq",
        f"{PROCESSES} processes x max_jobs {P} (as above, default poll_delay 0.5 s)",
        "asyncio, 2 x 10, poll_delay 0.5 s (default)",
        ("-m", "arq", "peer_arq.WorkerSettings"),
    ),
    Peer(
        "celery",
        "celery",
        f"{PROCESSES} workers x gevent pool of {P} (httpx)",
        "gevent pool, 2 x 10",
        (*CELERY, "-P", "gevent", "--loglevel", "WARNING"),
    ),
    Peer(
        "celery-threads",
        "celery",
        f"{PROCESSES} workers x threads pool of {P} (httpx; default prefetch multiplier 4)",
        "threads pool, 2 x 10 (defaults)",
        (*CELERY, "-P", "threads", "--loglevel", "WARNING"),
    ),
)
SYSTEMS = ("llmworker", *(p.name for p in PEERS))


@dataclass
class Row:
    system: str
    version: str
    how: str
    short: str
    makespan_s: float | None = None
    max_inflight: int | None = None
    completed: int = 0
    errors: str = ""
    failure: str = ""

    @property
    def utilisation(self) -> float | None:
        return None if self.makespan_s is None else IDEAL_S / self.makespan_s


# -- the peers' virtualenv -----------------------------------------------------------


def peers_python() -> Path:
    """.venv-peers' python, made or brought up to date with the requirements first."""
    python = VENV / "bin" / "python"
    stamp = VENV / ".installed"
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    print(f"installing {REQUIREMENTS.relative_to(ROOT)} into {VENV.name}", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
    stamp.write_text(wanted)
    return python


def versions(python: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys;"
        "print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))"
    )
    names = ["saq", "dramatiq", "taskiq", "taskiq-redis", "arq", "celery", "kombu"]
    out = subprocess.run(
        [str(python), "-c", code, *names], capture_output=True, text=True, check=True
    )
    found: dict[str, str] = json.loads(out.stdout)
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    found["llmworker"] = importlib.metadata.version("llmworker") + (
        f" ({commit})" if commit else ""
    )
    return found


def version_label(peer: Peer, found: dict[str, str]) -> str:
    label = found.get(peer.package, "?")
    if peer.package == "taskiq":
        label += f", taskiq-redis {found.get('taskiq-redis', '?')}"
    if peer.package == "celery":
        label += f", kombu {found.get('kombu', '?')}"
    return label


# -- processes -----------------------------------------------------------------------


def stop_all(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM a peer's workers at once, with the processes they forked; SIGKILL what is
    left after STOP_GRACE_S. taskiq's worker sleeps through SIGTERM while its broker waits
    on a BRPOP with no timeout: without the kill it never exits."""
    family: list[psutil.Process] = []
    for proc in procs.values():
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(proc.pid)
            family += [parent, *parent.children(recursive=True)]
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=STOP_GRACE_S)
    for survivor in alive:
        with contextlib.suppress(psutil.Error):
            survivor.kill()
    psutil.wait_procs(alive, timeout=5)
    for proc in procs.values():
        proc.poll()


def tail(bench: Bench, name: str) -> str:
    """The last line a process logged, to say why it failed."""
    path = bench.logs / f"{name}.log"
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return lines[-1].strip()[:160] if lines else "(nothing logged)"


def check_alive(bench: Bench, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for name, proc in procs.items():
        if proc.poll() is not None:
            raise PeerFailed(f"{name} exited with {proc.returncode}: {tail(bench, name)}")


# -- one system ----------------------------------------------------------------------


LLMWORKER_HOW = f"{PROCESSES} replicas (serve), one guard: cap {CAP} shared"
LLMWORKER_SHORT = f"{PROCESSES} replicas, one shared cap of {CAP}"


def run_llmworker(bench: Bench, version: str) -> Row:
    row = Row("llmworker", version, LLMWORKER_HOW, LLMWORKER_SHORT)
    before = len(bench.figures)
    utilisation = saturation_run(bench, report=True)
    figures = {f.metric: f.value for f in bench.figures[before:]}
    row.makespan_s = IDEAL_S / utilisation
    row.max_inflight = CAP + int(figures["overshoot"])
    # saturation_run raises unless every task succeeded.
    row.completed = N
    return row


def run_peer(bench: Bench, peer: Peer, python: Path, version: str) -> Row:
    row = Row(peer.name, version, peer.how, peer.short)
    fake_port = free_port()
    fake_url = f"http://127.0.0.1:{fake_port}"
    client = redis.Redis.from_url(bench.redis_url)
    env = {
        "PEERS_REDIS_URL": bench.redis_url,
        "PEERS_LLM_URL": f"{fake_url}/v1/chat/completions",
        "PEERS_MODEL": "m1",
        "PEERS_MESSAGES": orjson.dumps(CHAT_INPUT["messages"]).decode(),
        "PEERS_CONCURRENCY": str(PER_PROCESS),
        "PYTHONPATH": str(PEERS_DIR),
        **dict(peer.env),
    }
    try:
        with (
            bench.fake_llm(fake_port, LATENCY_S * 1000, TOKENS),
            contextlib.ExitStack() as stack,
        ):
            wait_http(f"{fake_url}/_fake/stats")
            procs: dict[str, subprocess.Popen[bytes]] = {}
            try:
                for k in range(PROCESSES):
                    name = f"{peer.name}-{k}"
                    command = peer.command(python, k)
                    procs[name] = stack.enter_context(bench.process(name, command, env))
                wait_ready(bench, client, procs)
                first_enqueue = enqueue(bench, peer, python, env)
                try:
                    wait_done(bench, client, procs, first_enqueue)
                finally:
                    stats = httpx.get(f"{fake_url}/_fake/stats").json()
                    row.max_inflight = int(stats["max_inflight"].get("m1", 0))
                    measure(client, row, first_enqueue)
            finally:
                stop_all(procs)
    except PeerFailed as exc:
        row.failure = str(exc)
    except Exception as exc:  # a broken peer costs its row, not the run
        row.failure = f"{type(exc).__name__}: {exc}"[:160]
    finally:
        client.flushdb()
        client.close()
    return row


def wait_ready(
    bench: Bench, client: redis.Redis, procs: dict[str, subprocess.Popen[bytes]]
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while int(client.get(READY) or 0) < len(procs):  # type: ignore[arg-type]
        check_alive(bench, procs)
        if time.monotonic() > deadline:
            raise PeerFailed(f"workers not ready within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.1)


def enqueue(bench: Bench, peer: Peer, python: Path, env: dict[str, str]) -> float:
    """Run the peer's producer (bench/peers/produce.py); when its first enqueue began."""
    args = [str(python), "-m", "produce", peer.package, str(N), str(CLIENTS)]
    try:
        out = subprocess.run(
            args,
            env={**os.environ, **env},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=ENQUEUE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise PeerFailed(f"enqueueing took over {ENQUEUE_TIMEOUT_S:.0f} s") from None
    (bench.logs / f"{peer.name}-produce.log").write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1][:160]
        raise PeerFailed(f"enqueueing failed: {last}")
    produced = json.loads(out.stdout)
    print(f"  {peer.name}: {N} tasks enqueued in {produced['enqueued_s']:.2f} s", flush=True)
    return float(produced["first_enqueue"])


def wait_done(
    bench: Bench,
    client: redis.Redis,
    procs: dict[str, subprocess.Popen[bytes]],
    first_enqueue: float,
) -> None:
    deadline = first_enqueue + FINISH_TIMEOUT_S
    seen, progressed = 0, time.monotonic()
    while (done := int(client.hlen(DONE))) < N:  # type: ignore[arg-type]
        check_alive(bench, procs)
        if done > seen:
            seen, progressed = done, time.monotonic()
        if time.time() > deadline:
            raise PeerFailed(f"{done:,} of {N:,} tasks finished within {FINISH_TIMEOUT_S:.0f} s")
        if time.monotonic() - progressed > STALL_S:
            raise PeerFailed(f"{done:,} of {N:,} tasks finished, then none for {STALL_S:.0f} s")
        time.sleep(0.2)


def measure(client: redis.Redis, row: Row, first_enqueue: float) -> None:
    """The row's figures from the tasks' own records."""
    records = [orjson.loads(v) for v in client.hvals(DONE)]  # type: ignore[union-attr]
    errors: dict[bytes, bytes] = client.hgetall(ERRORS)  # type: ignore[assignment]
    row.errors = ", ".join(f"{int(v)} {k.decode()}" for k, v in errors.items())
    texts = [text for _, text in records]
    expected = max(set(texts), key=texts.count) if texts else ""
    wrong = sum(not t or t != expected for t in texts)
    if wrong:
        row.errors = ", ".join(filter(None, [row.errors, f"{wrong} with another text"]))
    row.completed = len(records) - wrong
    if records and not row.failure and len(records) >= N:
        row.makespan_s = max(t for t, _ in records) - first_enqueue


def run_system(bench: Bench, system: str, python: Path, found: dict[str, str]) -> Row:
    if system != "llmworker":
        peer = next(p for p in PEERS if p.name == system)
        return run_peer(bench, peer, python, version_label(peer, found))
    try:
        return run_llmworker(bench, found["llmworker"])
    except Exception as exc:  # as for a peer: the row says why
        failure = f"{type(exc).__name__}: {exc}"[:160]
        return Row(system, found["llmworker"], LLMWORKER_HOW, LLMWORKER_SHORT, failure=failure)


# -- output --------------------------------------------------------------------------


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| system | version | how it ran (processes x concurrency) | utilisation | makespan "
        "| tasks/s | max in flight (cap 20) | tasks completed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.failure or row.utilisation is None or row.makespan_s is None:
            figures = [f"failed: {row.failure or 'no figures'}", "-", "-"]
        else:
            figures = [
                f"{row.utilisation:.3f}",
                f"{row.makespan_s:.2f} s",
                f"{N / row.makespan_s:,.0f}",
            ]
        if row.max_inflight is None:
            inflight = "-"
        else:
            over = row.max_inflight - CAP
            inflight = f"{row.max_inflight} ({f'overshoot {over}' if over > 0 else 'no overshoot'})"
        completed = f"{row.completed:,} of {N:,}"
        if row.errors:
            completed += f" ({row.errors})"
        lines.append(
            f"| {row.system} | {row.version} | {row.how} | "
            + " | ".join([*figures, inflight, completed])
            + " |"
        )
    return lines


NOTES = f"""\
How each ran:

- Every system ran {PROCESSES} worker processes against its own fresh `llmworker fake-llm
  --latency-ms 100 --tokens 5` (model `m1`, the same messages), in Redis database 15 of
  the same Redis. "max in flight" is the most calls the provider saw at once.
- llmworker: `bench.run.saturation_run` as `make bench` runs it (`llmworker serve` x 2,
  MAX_M1_PAID=20 held across both replicas by Redis leases; 64 HTTP clients, 32 per
  replica); completion times from the workers' task records.
- Peers: the cap of 20 is split by hand, {PER_PROCESS} per process, since none has a guard
  across processes. Each task is one streamed chat completion read to its end (aiohttp
  in the asyncio peers, one httpx.Client per process in the thread and gevent ones), then
  its text and finish time written to Redis by the task itself (bench/peers/peerlib.py);
  utilisation = 10 s / (first enqueue -> last recorded finish). Enqueueing: 64
  concurrent enqueuers in one producer process (coroutines for saq, taskiq and arq,
  threads for dramatiq and celery). Defaults otherwise: dramatiq's retries and prefetch,
  celery's prefetch multiplier (4) and no result backend, saq's and arq's job defaults
  (both keep results), taskiq's ListQueueBroker (BRPOP) with no result backend.
- arq looks for new jobs every `poll_delay`, 0.5 s by default, so a slot freed by a 100 ms
  call waits for the next look: `arq` polls every 0.01 s (the best of 0.05, 0.02 and
  0.01 s here), `arq-default` shows the default.
- celery's threads pool with the default prefetch idles between refills of its prefetched
  tasks (`celery-threads`); the gevent pool, celery's advice for I/O-bound tasks, needed
  no tuning, so `celery` uses it.
- Versions: one .venv-peers holds all five peers, and every arq release needs redis<6,
  so celery, taskiq and taskiq-redis are the newest that install beside it, not their
  latest (bench/requirements-peers.txt says which).
- The machine is small: workers, provider, Redis and the load generator share 2 cores,
  so CPU spent by one system's workers slows its own provider calls. Compare rows of one
  run, not across runs.
"""


def write(rows: list[Row], wall_s: float, load: float, python: Path, url: str) -> None:
    client = redis.Redis.from_url(url)
    server: dict[str, str] = client.info("server")  # type: ignore[assignment]
    client.close()
    head = [
        "# W1 saturation: llmworker and five peer task queues",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} by `python -m bench.peers` (one run, "
        f"{wall_s:.0f} s wall time) on {os.cpu_count()} cores shared by workers, provider, "
        f"Redis and load generator (1-minute load average {load:.2f} before the run); "
        f"Python {platform.python_version()}, {platform.machine()}, Redis "
        f"{server['redis_version']}.",
        "",
        f"W1: {PROCESSES} worker processes, a cap of {CAP} concurrent provider calls in "
        f"total, 100 ms per streamed call, {N:,} tasks from {CLIENTS} concurrent clients; "
        f"utilisation = ideal makespan ({N:,} x 0.1 s / {CAP} = {IDEAL_S:.0f} s) / "
        "(first submission -> last completion).",
        "",
        "![W1 saturation, utilisation per system](../docs/peers.png)",
        "",
    ]
    RESULTS.write_text("\n".join([*head, *table(rows), "", NOTES]))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(
            {"title": TITLE, "rows": [{**asdict(r), "utilisation": r.utilisation} for r in rows]},
            f,
        )
    try:
        subprocess.run([str(python), str(PEERS_DIR / "chart.py"), f.name, str(CHART)], check=True)
    finally:
        os.unlink(f.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("systems", nargs="*", help=f"some of: {', '.join(SYSTEMS)}")
    args = parser.parse_args(argv)
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    chosen = [s for s in SYSTEMS if s in args.systems] if args.systems else list(SYSTEMS)

    started_at, load = time.monotonic(), os.getloadavg()[0]
    python = peers_python()
    found = versions(python)
    url = os.environ.get("BENCH_PEERS_REDIS_URL", "redis://127.0.0.1:6379/15")
    client = redis.Redis.from_url(url)
    if keys := client.dbsize():
        parser.error(f"{url} holds {keys} keys: the benchmark needs that database empty")
    rows: list[Row] = []
    try:
        with tempfile.TemporaryDirectory(prefix="llmworker-peers-") as tmp:
            bench = Bench(url, Path(tmp))
            for system in chosen:
                print(f"{system}: W1 saturation", flush=True)
                began = time.monotonic()
                rows.append(run_system(bench, system, python, found))
                client.flushdb()
                took = time.monotonic() - began
                print(f"  {system}: {took:.0f} s with start-up and shutdown", flush=True)
    finally:
        client.flushdb()
        client.close()
    wall_s = time.monotonic() - started_at
    print("\n" + "\n".join(table(rows)))
    print(f"\nwall time {wall_s:.0f} s")
    if chosen == list(SYSTEMS):
        write(rows, wall_s, load, python, url)
        print(f"wrote {RESULTS.relative_to(ROOT)} and {CHART.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
