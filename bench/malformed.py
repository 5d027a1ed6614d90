"""(e) malformed: the requests of ``bench/probes.py`` against a live replica, on raw
sockets (so nothing on the way tidies them up), eight at a time.

Invariants: no 5xx; every event stream that answered 200 ends with its ``record`` event;
no task is created by a refused request (new task records == 202 answers); no callback
reaches a loopback address (the worker runs without ``CALLBACK_ALLOWED_HOSTS``, so only
public addresses are allowed); the replica still answers ``/health`` and ``/ready``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from dataclasses import dataclass

import httpx

from bench.common import free_port
from bench.harness import (
    CALLBACK_SECRET,
    CallbackReceiver,
    Cluster,
    Context,
    Records,
    Report,
    distribution,
    wait_http,
    worker_env,
)
from bench.probes import BASE, Probe, generate

QSTASH_KEYS = {
    "QSTASH_CURRENT_SIGNING_KEY": "sig_chaos_current_0123456789abcdef",
    "QSTASH_NEXT_SIGNING_KEY": "sig_chaos_next_0123456789abcdef0123",
}
CONCURRENCY = 8
ANSWER_TIMEOUT_S = 10.0
# What today's code answers to these is reported case by case (some are being tightened).
WATCHED = ["Content-Type", "callback URLs", "event ids", "deep nesting", "headers"]
WATCHED += ["oversized bodies", "cut uploads"]
# Connections opened before the probes and looked at after them (at least this long
# after, in the full run): does the worker close one that idles or sends slowly?
SLOW_HOLD_S = 30.0
SLOW_STARTS = {
    "idle": b"",
    "only CRLFs": b"\r\n" * 100,
    "half a request line": b"GET /hea",
    "headers unfinished": b"GET /health HTTP/1.1\r\nHost: x\r\n",
    "body unfinished": b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
}


@dataclass(frozen=True)
class Answer:
    probe: Probe
    status: int | None
    outcome: str  # answered | closed without answer | no answer in time | closed by us
    stream_cut: bool = False

    @property
    def shown(self) -> str:
        return str(self.status) if self.status is not None else self.outcome


# -- sending -------------------------------------------------------------------------


async def send(probe: Probe, port: int) -> Answer:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    # Read while writing: the worker may answer (413) and close before a big body is all
    # sent, and the reset that our remaining bytes then cause would discard its answer.
    reading = asyncio.create_task(_read_all(reader))
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(probe.data)
            await writer.drain()
        if probe.cut:
            await asyncio.sleep(0.2)
            return Answer(probe, None, "closed by us")
        try:
            raw = await asyncio.wait_for(reading, ANSWER_TIMEOUT_S)
        except TimeoutError:
            return Answer(probe, None, f"no answer in {ANSWER_TIMEOUT_S:g} s")
    finally:
        reading.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return parse_answer(probe, raw)


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


def parse_answer(probe: Probe, raw: bytes) -> Answer:
    while raw.startswith(b"HTTP/1.1 1"):  # interim answers (100 Continue)
        raw = raw.partition(b"\r\n\r\n")[2]
    if not raw.startswith(b"HTTP/"):
        return Answer(probe, None, "closed without answer")
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(None, 2)[1])
    cut = False
    if probe.stream and status == 200:
        chunked = b"transfer-encoding: chunked" in head.lower()
        complete, text = dechunk(body) if chunked else (True, body)
        cut = not complete or b"event: record" not in text
    return Answer(probe, status, "answered", cut)


def dechunk(body: bytes) -> tuple[bool, bytes]:
    """(whether the last chunk arrived, the payload so far)."""
    out: list[bytes] = []
    while True:
        line, sep, rest = body.partition(b"\r\n")
        try:
            size = int(line.split(b";")[0], 16) if sep else -1
        except ValueError:
            size = -1
        if size < 0 or len(rest) < size + 2:
            return False, b"".join(out)
        if size == 0:
            return True, b"".join(out)
        out.append(rest[:size])
        body = rest[size + 2 :]


def open_slow(port: int) -> dict[str, socket.socket]:
    """One connection per SLOW_STARTS case, its bytes sent, left open."""
    held = {}
    for name, data in SLOW_STARTS.items():
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(data)
        sock.setblocking(False)
        held[name] = sock
    return held


def still_open(held: dict[str, socket.socket]) -> list[str]:
    """The held connections the worker neither answered nor closed."""
    waiting = []
    for name, sock in held.items():
        try:
            sock.recv(1)  # b"": closed; bytes: answered
        except BlockingIOError:
            waiting.append(name)
        except OSError:
            pass
        finally:
            sock.close()
    return waiting


async def send_all(probes: list[Probe], port: int) -> list[Answer]:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(probe: Probe) -> Answer:
        async with gate:
            try:
                return await send(probe, port)
            except OSError as exc:
                return Answer(probe, None, f"connection failed: {type(exc).__name__}")

    return await asyncio.gather(*(one(p) for p in probes))


# -- the scenario --------------------------------------------------------------------


def malformed(ctx: Context) -> Report:
    """One replica, the probes, then: the new task records against the 202 answers, the
    callbacks the loopback receiver got, and whether the replica still answers."""
    report = Report("malformed")
    with CallbackReceiver() as receiver, Cluster(ctx) as cluster:
        env = worker_env(
            ctx,
            CALLBACK_SECRET=CALLBACK_SECRET,
            CALLBACK_TIMEOUT_S=2,
            FAKE_LATENCY_MS=20,
            FAKE_TOKENS=3,
            MAX_FAKE_FREE=50,
            MAX_FAKE_PAID=50,
            MAX_USER_FREE=50,
            MAX_USER_PAID=50,
            QUEUE_MAX_FREE=100_000,
            QUEUE_MAX_PAID=100_000,
            **QSTASH_KEYS,
        )
        port = free_port()
        proc, url = cluster.serve(
            "replica", {**env, "PUBLIC_URL": f"http://127.0.0.1:{port}"}, port
        )
        wait_http(f"{url}/ready", proc)
        with (
            httpx.Client(base_url=url, timeout=30) as client,
            Records(ctx.redis_url, ctx.prefix) as records,
        ):
            # A finished task, whose event stream the event id probes read.
            target = client.post("/v1/tasks", json={**BASE, "id": "target"}).json()["id"]
            records.wait_final([target], 60)
            probes = generate(ctx.seed, ctx.quick, target, receiver.port)
            before = records.count_tasks()
            started = time.monotonic()
            held = open_slow(port)
            answers = asyncio.run(send_all(probes, port))
            took_s = time.monotonic() - started
            drained = wait_drained(client)
            time.sleep(2)  # the first attempt of every callback
            if not ctx.quick:
                time.sleep(max(0.0, started + SLOW_HOLD_S - time.monotonic()))
            held_s = time.monotonic() - started
            open_after = still_open(held)
            new_tasks = records.count_tasks() - before
            health = client.get("/health").status_code
            ready = client.get("/ready").status_code
        asgi_errors = proc.log_count("Exception in ASGI application")
        raised = proc.exceptions()
    add_answers(report, answers, took_s, new_tasks)
    reached = len(receiver.snapshot())
    report.add("callbacks that reached the loopback receiver", reached)
    report.add("'Exception in ASGI application' in the log", asgi_errors)
    report.add("exceptions in the log", distribution(raised))
    report.add("/health, /ready after the run", f"{health}, {ready}")
    report.add(
        f"idle or slow connections still open after {held_s:.0f} s",
        f"{len(open_after)} of {len(SLOW_STARTS)}"
        + (f": {', '.join(open_after)}" if open_after else ""),
    )
    report.check("no callback reached a loopback address", reached == 0, f"{reached} did")
    report.check(
        "the replica still answers and drains its queue",
        health == 200 and ready == 200 and drained,
        f"/health {health}, /ready {ready}, queue drained: {drained}",
    )
    return report


def wait_drained(client: httpx.Client, timeout_s: float = 60) -> bool:
    """Until no task waits or runs (the accepted probes run on the in-process model)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            stats = client.get("/v1/stats").json()
            if stats["running"] == 0 and all(q["waiting"] == 0 for q in stats["queues"].values()):
                return True
        time.sleep(0.2)
    return False


def add_answers(report: Report, answers: list[Answer], took_s: float, new_tasks: int) -> None:
    server_errors = [a for a in answers if a.status is not None and a.status >= 500]
    cut = [a for a in answers if a.stream_cut]
    created = sum(a.status == 202 for a in answers)
    streams = sum(a.probe.stream and a.status == 200 for a in answers)
    report.add("requests sent", f"{len(answers)} in {took_s:.1f} s")
    report.add("answers by status", distribution([a.shown for a in answers]))
    categories: dict[str, list[Answer]] = {}
    for a in answers:
        categories.setdefault(a.probe.category, []).append(a)
    for category, group in categories.items():
        report.add(f"{category} ({len(group)})", distribution([a.shown for a in group]))
    for category in WATCHED:
        if category in categories:
            report.add(f"{category}, case by case", by_answer(categories[category]))
    report.add("5xx answers", len(server_errors))
    report.add("event streams answered 200 / cut", f"{streams} / {len(cut)}")
    report.add("202 answers / new task records", f"{created} / {new_tasks}")
    report.check("no 5xx answer", not server_errors, examples(server_errors), cases(server_errors))
    report.check("no event stream that answered 200 is cut", not cut, examples(cut), cases(cut))
    report.check(
        "no task created by a refused request",
        new_tasks == created,
        f"{new_tasks} new task records for {created} answers 202",
    )


def by_answer(answers: list[Answer]) -> str:
    """``202: none, text/plain; 415: ...``: which cases got which answer."""
    labels: dict[str, Counter[str]] = {}
    for a in answers:
        key = "200, cut" if a.stream_cut else a.shown
        labels.setdefault(key, Counter())[a.probe.label] += 1
    return "; ".join(f"{key}: {', '.join(sorted(c))}" for key, c in sorted(labels.items()))


def cases(answers: list[Answer]) -> list[str]:
    return [f"{a.probe.category}: {a.probe.label}" for a in answers]


def examples(answers: list[Answer]) -> str:
    if not answers:
        return ""
    first = answers[:6]
    shown = ", ".join(f"{c} -> {a.shown}" for c, a in zip(cases(first), first, strict=True))
    return f"{len(answers)}, e.g. {shown}"
