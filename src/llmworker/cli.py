"""The ``llmworker`` command: serve, submit, status, stats, check, fake-llm, qstash-dev."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson

from llmworker import __version__
from llmworker.client import ApiError, Client
from llmworker.errors import ConfigError, EmbeddedRedisError

EXIT_CONFIG = 2


def _client_defaults() -> tuple[str, str | None]:
    """Where the client commands find the worker: LLMWORKER_URL, else this machine's PORT."""
    url = os.environ.get("LLMWORKER_URL") or f"http://127.0.0.1:{os.environ.get('PORT', '8080')}"
    key = os.environ.get("LLMWORKER_API_KEY")
    if key is None and os.environ.get("API_KEYS"):
        key = os.environ["API_KEYS"].split(",")[0].strip()
    return url.rstrip("/"), key


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def cmd_serve(args: argparse.Namespace) -> int:
    from llmworker.server import serve

    overrides: dict[str, Any] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port:
        overrides["port"] = args.port
    return serve(workers=args.workers, reload=args.reload, **overrides)


def _read_input(raw: str) -> Any:
    if raw.startswith("@"):
        try:
            text = Path(raw[1:]).read_text()
        except OSError as exc:
            raise SystemExit(f"--input {raw}: cannot read the file: {exc.strerror}") from None
    else:
        text = raw
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--input is not valid JSON: {exc}") from None


def cmd_submit(args: argparse.Namespace) -> int:
    fields = {
        f: getattr(args, f)
        for f in ("user", "tier", "model", "id", "idempotency_key", "callback_url", "timeout_s")
    }
    with Client(args.url, api_key=args.api_key) as client:
        record = client.submit(args.kind, _read_input(args.input), **fields)
        if not args.wait:
            _print_json(record)
            return 0
        print(f"task {record['id']}: {record['status']}", file=sys.stderr)
        final: dict[str, Any] = {}
        text = False
        for event in client.events(record["id"]):
            final = _show_event(event.type, event.data, text) or final
            text = text or event.type == "tokens"
    _print_json(final)
    return 0 if final.get("status") == "succeeded" else 1


def _show_event(event: str, data: dict[str, Any], after_text: bool) -> dict[str, Any] | None:
    """Print one event (tokens to stdout, the rest to stderr); the final record."""
    if event == "tokens":
        sys.stdout.write(data.get("text", ""))
        sys.stdout.flush()
    elif event == "record":
        return data
    elif event == "status":
        # Streamed text has no newline of its own: end its line before a status line.
        if after_text:
            sys.stdout.write("\n")
            sys.stdout.flush()
        print(f"[{data.get('status')}] attempt {data.get('attempts')}", file=sys.stderr)
    elif event == "progress":
        print(f"[progress] {json.dumps(data)}", file=sys.stderr)
    return None


def cmd_status(args: argparse.Namespace) -> int:
    with Client(args.url, api_key=args.api_key) as client:
        _print_json(client.get(args.id))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with Client(args.url, api_key=args.api_key) as client:
        stats = client.stats()
    if args.json:
        _print_json(stats)
        return 0
    print(
        f"replicas alive: {stats['replicas_alive']}   running: {stats['running']}"
        f"   callbacks waiting: {stats.get('callbacks_waiting', 0)}"
    )
    for tier, q in stats["queues"].items():
        per_model = ", ".join(f"{m}={n}" for m, n in q["models"].items()) or "-"
        print(
            f"queue {tier:<8} waiting {q['waiting']:>6} / cap {q['cap']:<6} by model: {per_model}"
        )
    for model, g in stats["guards"].items():
        tiers = "  ".join(f"{t} {u['in_use']}/{u['limit']}" for t, u in g["tiers"].items())
        total = f"  total {g['total']['in_use']}/{g['total']['limit']}" if "total" in g else ""
        print(f"model {model:<14} {tiers}{total}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    try:
        response = httpx.get(f"{args.url}/ready", timeout=args.timeout)
    except httpx.HTTPError as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1
    if response.status_code == 200:
        return 0
    print(f"not ready: {response.status_code} {response.text}", file=sys.stderr)
    return 1


def cmd_fake_llm(args: argparse.Namespace) -> int:
    from llmworker.fakellm import FakeConfig, run_fake_llm

    config = FakeConfig(
        latency_ms=args.latency_ms,
        jitter_ms=args.jitter_ms,
        tokens=args.tokens,
        rate_429=args.rate_429,
        rate_500=args.rate_500,
        rate_timeout=args.rate_timeout,
        retry_after_s=args.retry_after_s,
        seed=args.seed,
    )
    run_fake_llm(config, host=args.host, port=args.port)
    return 0


def cmd_qstash_dev(args: argparse.Namespace) -> int:
    import secrets

    import uvicorn

    from llmworker.qstashdev import QStashDev

    current = args.current_signing_key or os.environ.get("QSTASH_CURRENT_SIGNING_KEY")
    nxt = args.next_signing_key or os.environ.get("QSTASH_NEXT_SIGNING_KEY")
    current = current or "sig_dev_" + secrets.token_hex(12)
    nxt = nxt or "sig_dev_" + secrets.token_hex(12)
    dev = QStashDev(args.token, current, nxt, retry_scale=args.retry_scale)
    url = f"http://{args.host}:{args.port}"
    print(
        f"QStash-compatible development server on {url}; give the worker and producers:\n"
        f"  QSTASH_URL={url}\n  QSTASH_TOKEN={args.token}\n"
        f"  QSTASH_CURRENT_SIGNING_KEY={current}\n  QSTASH_NEXT_SIGNING_KEY={nxt}",
        flush=True,
    )
    uvicorn.run(dev.app(), host=args.host, port=args.port, log_level="warning")
    return 0


def parser() -> argparse.ArgumentParser:
    url, key = _client_defaults()
    p = argparse.ArgumentParser(
        prog="llmworker", description="A self-hosted worker for slow LLM jobs."
    )
    p.add_argument("--version", action="version", version=f"llmworker {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the HTTP API and the dispatcher")
    s.add_argument("--host", help="address to listen on (HOST, default 0.0.0.0)")
    s.add_argument("--port", type=int, help="port to listen on (PORT, default 8080)")
    s.add_argument("--workers", type=int, default=1, help="processes sharing the port (default 1)")
    s.add_argument("--reload", action="store_true", help="restart on code changes (development)")
    s.set_defaults(fn=cmd_serve)

    def client(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--url", default=url, help=f"the worker's URL (LLMWORKER_URL; now {url})")
        c.add_argument("--api-key", default=key, help="API key (LLMWORKER_API_KEY, else API_KEYS)")
        return c

    c = client("submit", "submit a task")
    c.add_argument("kind", help="the task kind, e.g. chat")
    c.add_argument("--input", required=True, help="the input as JSON, or @file")
    c.add_argument("--user")
    c.add_argument("--tier")
    c.add_argument("--model")
    c.add_argument("--id")
    c.add_argument("--idempotency-key")
    c.add_argument("--callback-url")
    c.add_argument("--timeout-s", type=float)
    c.add_argument("--wait", action="store_true", help="follow progress and print the result")
    c.set_defaults(fn=cmd_submit)

    c = client("status", "show a task's record")
    c.add_argument("id")
    c.set_defaults(fn=cmd_status)

    c = client("stats", "queue depths, guard slots, replicas")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_stats)

    c = client("check", "exit 0 if the worker is ready, else 1 (for health checks)")
    c.add_argument("--timeout", type=float, default=3.0)
    c.set_defaults(fn=cmd_check)

    f = sub.add_parser(
        "fake-llm", help="an OpenAI-compatible fake provider for development and tests"
    )
    f.add_argument("--host", default="127.0.0.1")
    f.add_argument("--port", type=int, default=9000)
    f.add_argument("--latency-ms", type=float, default=500.0, help="time to the last token")
    f.add_argument("--jitter-ms", type=float, default=0.0, help="uniform extra latency, 0..this")
    f.add_argument("--tokens", type=int, default=20, help="tokens per completion")
    f.add_argument("--rate-429", type=float, default=0.0, help="share of calls answered 429")
    f.add_argument("--rate-500", type=float, default=0.0, help="share of calls answered 500")
    f.add_argument("--rate-timeout", type=float, default=0.0, help="share of calls that hang")
    f.add_argument("--retry-after-s", type=float, default=1.0, help="Retry-After sent with 429")
    f.add_argument("--seed", type=int, default=None, help="seed for the error draws")
    f.set_defaults(fn=cmd_fake_llm)

    q = sub.add_parser("qstash-dev", help="a QStash-compatible server for development and tests")
    q.add_argument("--host", default="127.0.0.1")
    q.add_argument("--port", type=int, default=8081)
    q.add_argument("--token", default="llmworker-dev", help="the QSTASH_TOKEN producers send")
    q.add_argument("--current-signing-key", help="(QSTASH_CURRENT_SIGNING_KEY, else generated)")
    q.add_argument("--next-signing-key", help="(QSTASH_NEXT_SIGNING_KEY, else generated)")
    q.add_argument(
        "--retry-scale",
        type=float,
        default=1.0,
        help="multiplies QStash's retry backoff (0.01: seconds instead of minutes); "
        "a Retry-After is honoured as given",
    )
    q.set_defaults(fn=cmd_qstash_dev)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except ConfigError as exc:
        print("llmworker: invalid configuration:", file=sys.stderr)
        for line in exc.problems:
            print(f"  - {line}", file=sys.stderr)
        return EXIT_CONFIG
    except EmbeddedRedisError as exc:
        print(f"llmworker: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except ApiError as exc:
        print(f"llmworker: the worker answered {exc.status}: {exc.message}", file=sys.stderr)
        return 1
    except httpx.ConnectError as exc:
        print(f"llmworker: cannot reach the worker at {args.url}: {exc}", file=sys.stderr)
        return 1
