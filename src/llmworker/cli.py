"""The ``llmworker`` command.

Server commands: ``serve``, ``fake-llm``, ``qstash-dev`` (they need the server's
dependencies). Client commands, which talk to a running worker over HTTP: ``submit``,
``status``, ``cancel``, ``events``, ``stats``, ``top``, ``check``. Client commands read
``.env`` as ``serve`` does; the worker is ``--url`` (``LLMWORKER_URL``, else this
machine's ``PORT``) and the key ``--api-key`` (``LLMWORKER_API_KEY``, else the first of
``ADMIN_KEYS``, else of ``API_KEYS``).

Every mistake ends as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import orjson
from dotenv import dotenv_values

from llmworker import __version__
from llmworker.auth import first_key
from llmworker.client import ApiError, Client, WorkerUnreachable
from llmworker.errors import ConfigError, LLMWorkerError
from llmworker.usage_cli import add_arguments as add_usage_arguments
from llmworker.usage_cli import cmd_usage

EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows every option's default (none where there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default:" in text:
            return text
        if action.default is None or action.default is False:
            return text
        if action.default == argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def environment(env_file: str | Path = ".env") -> dict[str, str]:
    """The process environment over ``.env``, as ``serve`` reads them."""
    merged = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
    return {**merged, **os.environ}


def client_defaults(env: Mapping[str, str]) -> tuple[str, str | None]:
    """Where the client commands find the worker, and the key they send."""
    url = env.get("LLMWORKER_URL")
    if not url:
        port = env.get("PORT") or "8080"
        if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(
                [f"PORT={port!r} is not a port number (client commands use it when "
                 "LLMWORKER_URL is not set)"]
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
    key = env.get("LLMWORKER_API_KEY") or first_key(
        env.get("API_KEYS", ""), env.get("ADMIN_KEYS", "")
    )
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
    if raw == "@-":
        text = sys.stdin.read()
    elif raw.startswith("@"):
        try:
            text = Path(raw[1:]).read_text()
        except OSError as exc:
            raise SystemExit(
                f"llmworker: --input {raw}: cannot read the file: {exc.strerror}"
            ) from None
    else:
        text = raw
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"llmworker: --input is not valid JSON: {exc}") from None


def _client(args: argparse.Namespace, **options: Any) -> Client:
    return Client(args.url, api_key=args.api_key, tenant=getattr(args, "tenant", None), **options)


def cmd_submit(args: argparse.Namespace) -> int:
    fields = {
        f: getattr(args, f)
        for f in ("user", "tier", "model", "id", "idempotency_key", "callback_url", "timeout_s")
    }
    with _client(args) as client:
        record = client.submit(args.kind, _read_input(args.input), **fields)
        if not args.wait:
            _print_json(record)
            return 0
        print(f"task {record['id']}: {record['status']}", file=sys.stderr)
        final: dict[str, Any] = {}
        text = False
        for event in client.events(record["id"]):
            final = _show_event(event.type, event.data, text) or final
            if event.type == "status":
                text = False
            text = text or event.type in ("tokens", "reasoning")
    _print_json(final)
    return 0 if final.get("status") == "succeeded" else 1


def _show_event(event: str, data: dict[str, Any], after_text: bool) -> dict[str, Any] | None:
    """Print one event (the answer's text to stdout, the rest to stderr); the final
    record."""
    if event == "tokens":
        sys.stdout.write(data.get("text", ""))
        sys.stdout.flush()
    elif event == "reasoning":
        sys.stderr.write(data.get("text", ""))
        sys.stderr.flush()
    elif event == "record":
        return data
    elif event == "status":
        # Streamed text has no newline of its own: end its line before a status line.
        if after_text:
            sys.stdout.write("\n")
            sys.stdout.flush()
        run = data.get("run") or 1
        again = f" (run {run}: the text starts over)" if run > 1 else ""
        print(f"[{data.get('status')}] attempt {data.get('attempts')}{again}", file=sys.stderr)
    elif event == "progress":
        print(f"[progress] {json.dumps(data)}", file=sys.stderr)
    return None


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_json(client.get(args.id))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        record = client.cancel(args.id)
    _print_json(record)
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    with _client(args) as client:
        record = client.retry(args.id)
    _print_json(record)
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    """Follow a task's events, one JSON object per line, until its final record."""
    with _client(args) as client:
        for event in client.events(args.id, last_event_id=args.after):
            line = {"id": event.id, "event": event.type, "data": event.data}
            sys.stdout.write(orjson.dumps(line).decode() + "\n")
            sys.stdout.flush()
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
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
        held = (stats.get("held") or {}).get(model)
        waiting = f"  held {held:.1f} s (the provider asked to wait)" if held else ""
        print(f"model {model:<14} {tiers}{total}{waiting}{_provider_state(stats, model)}")
    return 0


def _provider_state(stats: dict[str, Any], model: str) -> str:
    """What the model's provider said lately: its adaptive cap, its circuit."""
    out = ""
    if adaptive := (stats.get("adaptive_caps") or {}).get(model):
        out += f"  adaptive cap {adaptive['cap']} of {adaptive['max']}"
    if circuit := (stats.get("circuits") or {}).get(model):
        state = circuit["state"].replace("_", "-")
        left = f" {circuit['left_s']:.0f} s more" if circuit["state"] == "open" else ""
        out += f"  circuit {state}{left} ({circuit['code']})"
    return out


def cmd_top(args: argparse.Namespace) -> int:
    from llmworker.observe.top import REQUEST_TIMEOUT_S, top  # rich: loaded by this command only

    with _client(args, timeout_s=REQUEST_TIMEOUT_S) as client:
        top(client.stats, url=client.url, interval_s=args.interval, once=args.once)
    return 0


def _finite(raw: str) -> float:
    """A finite number, else NaN (which fails every comparison below)."""
    try:
        value = float(raw)
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def _seconds(raw: str) -> float:
    value = _finite(raw)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a finite number of seconds above 0")
    return value


def _count(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()):
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number of 0 or more")
    return int(raw)


def _amount(raw: str) -> float:
    value = _finite(raw)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a finite number of 0 or more")
    return value


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


def _contexts(raw: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in raw.split(","):
        model, sep, size = part.partition("=")
        if not sep or not model.strip() or not size.strip().isdigit() or int(size) < 1:
            raise argparse.ArgumentTypeError(
                f"{part!r} must be <model>=<tokens>, e.g. m1=8000 (comma-separated)"
            )
        out[model.strip()] = int(size)
    return out


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
        capacity=args.capacity,
        rpm=args.rpm,
        tpm=args.tpm,
        window_s=args.window_s,
        error_style=args.error_style,
        load_knee=args.load_knee,
        load_ttft_ms=args.load_ttft_ms,
        keepalive_s=args.keepalive_s,
        quota_tokens=args.quota_tokens,
        stamp=args.stamp,
        quota_status=args.quota_status,
        down=[m for m in (args.down or "").split(",") if m],
        down_status=args.down_status,
        outage_after_s=args.outage_after_s,
        outage_for_s=args.outage_for_s,
        context=args.context or {},
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


def parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = environment() if env is None else env
    try:
        url, key = client_defaults(env)
    except ConfigError:
        # Reported when a client command runs; serve reports PORT its own way.
        url, key = "http://127.0.0.1:8080", None
    p = argparse.ArgumentParser(
        prog="llmworker",
        description="A self-hosted worker for slow LLM jobs.",
        formatter_class=Formatter,
    )
    p.add_argument("--version", action="version", version=f"llmworker {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, fn: Callable[[argparse.Namespace], int]) -> Any:
        c = sub.add_parser(name, help=help, description=help, formatter_class=Formatter)
        c.set_defaults(fn=fn)
        return c

    s = command(
        "serve",
        "run the HTTP API and the dispatcher; settings come from the environment and .env "
        "(README, Configuration)",
        cmd_serve,
    )
    s.add_argument("--host", help="address to listen on (HOST; default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port to listen on (PORT; default 8080)")
    s.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    s.add_argument("--reload", action="store_true", help="restart on code changes (development)")

    def client(
        name: str, help: str, fn: Callable[[argparse.Namespace], int], keyed: bool = True
    ) -> Any:
        c = command(name, help, fn)
        c.set_defaults(client=True)
        c.add_argument(
            "--url", default=url, help="the worker's URL (LLMWORKER_URL, else PORT on 127.0.0.1)"
        )
        if not keyed:
            return c
        c.add_argument(
            "--tenant", help="with an admin key: act for this tenant (default: the key's own)"
        )
        # The default is a secret: help says whether there is one, not what it is.
        c.add_argument(
            "--api-key",
            help="API key sent as a bearer token (default: LLMWORKER_API_KEY, else the first "
            f"of ADMIN_KEYS or API_KEYS; now {'set' if key else 'none'})",
        )
        c.set_defaults(api_key=key)
        return c

    c = client("submit", "submit a task", cmd_submit)
    c.add_argument("kind", help="the task kind, e.g. chat")
    c.add_argument("--input", required=True, help="the input as JSON, @file, or @- (stdin)")
    c.add_argument("--user", help="the user the task counts against (default: anonymous)")
    c.add_argument("--tier", help="admission tier (default: DEFAULT_TIER)")
    c.add_argument(
        "--model",
        help="model alias (default: the model the kind's handler names for the tier, else "
        "DEFAULT_MODEL)",
    )
    c.add_argument("--id", help="the task's id (default: a new ULID)")
    c.add_argument("--idempotency-key", help="a repeat with this key finds the same task")
    c.add_argument("--callback-url", help="where the final record is POSTed, signed")
    c.add_argument("--timeout-s", type=float, help="deadline of a run (default: TASK_TIMEOUT_S)")
    c.add_argument("--wait", action="store_true", help="follow progress and print the result")

    c = client("status", "show a task's record", cmd_status)
    c.add_argument("id", help="the task's id")

    c = client("cancel", "cancel a task: a queued one never runs, a running one stops", cmd_cancel)
    c.add_argument("id", help="the task's id")

    c = client("retry", "submit a finished task's input again as a new task", cmd_retry)
    c.add_argument("id", help="the finished task's id")

    c = client("events", "follow a task's events (one JSON object per line)", cmd_events)
    c.add_argument("id", help="the task's id")
    c.add_argument("--after", help="resume after this event id (an event's id field)")

    c = client("stats", "queue depths, guard slots, replicas (an admin key)", cmd_stats)
    c.add_argument("--json", action="store_true", help="print the JSON answer")

    c = client("usage", "tokens and cost by day, model, tier or user (the ledger)", cmd_usage)
    add_usage_arguments(c)

    c = client(
        "top",
        "the dashboard's numbers, redrawn live: lanes, throughput, provider health, running "
        "tasks (an admin key; Ctrl+C ends it)",
        cmd_top,
    )
    c.add_argument("--interval", type=_seconds, default=1.0, help="seconds between refreshes")
    c.add_argument("--once", action="store_true", help="print one frame and exit")

    c = client(
        "check", "exit 0 if the worker is ready, else 1 (for health checks)", cmd_check, False
    )
    c.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")

    f = command(
        "fake-llm", "an OpenAI-compatible fake provider for development and tests", cmd_fake_llm
    )
    f.add_argument("--host", default="127.0.0.1", help="address to listen on")
    f.add_argument("--port", type=int, default=9000, help="port to listen on")
    f.add_argument("--latency-ms", type=float, default=500.0, help="time to the last token")
    f.add_argument("--jitter-ms", type=float, default=0.0, help="uniform extra latency, 0..this")
    f.add_argument("--tokens", type=int, default=20, help="tokens per completion")
    f.add_argument("--rate-429", type=float, default=0.0, help="share of calls answered 429")
    f.add_argument("--rate-500", type=float, default=0.0, help="share of calls answered 500")
    f.add_argument("--rate-timeout", type=float, default=0.0, help="share of calls that hang")
    f.add_argument("--retry-after-s", type=float, default=1.0, help="Retry-After sent with 429")
    f.add_argument(
        "--seed", type=int, default=None, help="seed for the error draws (default: random)"
    )
    real = f.add_argument_group("how real providers push back (per model; 0: not at all)")
    real.add_argument("--capacity", type=_count, default=0, help="calls in flight; more get 429")
    real.add_argument("--rpm", type=_count, default=0, help="requests per minute (x-ratelimit-*)")
    real.add_argument("--tpm", type=_count, default=0, help="tokens per minute (x-ratelimit-*)")
    real.add_argument(
        "--window-s", type=_seconds, default=60.0, help="the length of the rpm and tpm windows"
    )
    real.add_argument(
        "--error-style",
        choices=["openai", "glm", "gemini"],
        default="openai",
        help="how a 429 reads (glm: error code 1302; gemini: RESOURCE_EXHAUSTED)",
    )
    real.add_argument(
        "--load-knee", type=_count, default=0, help="calls in flight before load slows it"
    )
    real.add_argument(
        "--load-ttft-ms",
        type=_amount,
        default=0.0,
        help="added to the first token per call past the knee",
    )
    real.add_argument(
        "--keepalive-s",
        type=_amount,
        default=0.0,
        help="SSE keep-alive comments while the first token waits",
    )
    real.add_argument(
        "--quota-tokens", type=_count, default=0, help="tokens before the quota runs out"
    )
    real.add_argument(
        "--quota-status",
        type=int,
        choices=[429, 402],
        default=429,
        help="429 insufficient_quota, or 402",
    )
    real.add_argument(
        "--stamp",
        action="store_true",
        help="each streamed piece is its send time (@<epoch s>), to time its way downstream",
    )
    real.add_argument("--down", help="models that are down, comma-separated ('*': all)")
    real.add_argument(
        "--context",
        type=_contexts,
        help="context windows, e.g. m1=8000,m2=128000: longer prompts get a 400",
    )
    real.add_argument("--down-status", type=int, default=503, help="what a down model answers")
    real.add_argument(
        "--outage-after-s",
        type=_amount,
        default=0.0,
        help="every model goes down this long after start",
    )
    real.add_argument("--outage-for-s", type=_amount, default=0.0, help="for this long")

    q = command(
        "qstash-dev", "a QStash-compatible server for development and tests", cmd_qstash_dev
    )
    q.add_argument("--host", default="127.0.0.1", help="address to listen on")
    q.add_argument("--port", type=int, default=8081, help="port to listen on")
    q.add_argument("--token", default="llmworker-dev", help="the QSTASH_TOKEN producers send")
    q.add_argument(
        "--current-signing-key", help="signing key (QSTASH_CURRENT_SIGNING_KEY, else generated)"
    )
    q.add_argument(
        "--next-signing-key", help="the next signing key (QSTASH_NEXT_SIGNING_KEY, else generated)"
    )
    q.add_argument(
        "--retry-scale",
        type=float,
        default=1.0,
        help="multiplies QStash's retry backoff (0.01: seconds instead of minutes); "
        "a Retry-After is honoured as given",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    env = environment()
    args = parser(env).parse_args(argv)
    try:
        if getattr(args, "client", False):
            client_defaults(env)  # a bad PORT is one line, before anything is sent
        return int(args.fn(args))
    except (LLMWorkerError, ModuleNotFoundError, httpx.HTTPError, httpx.InvalidURL) as exc:
        return _report(exc, args)
    except BrokenPipeError:
        # The reader went away (| head): no traceback, and none at exit either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _report(exc: Exception, args: argparse.Namespace) -> int:
    """One line (or one per problem) for a mistake, and the exit code."""
    if isinstance(exc, ConfigError):
        print("llmworker: invalid configuration:", file=sys.stderr)
        for line in exc.problems:
            print(f"  - {line}", file=sys.stderr)
        return EXIT_CONFIG
    if isinstance(exc, ApiError):
        print(f"llmworker: the worker answered {exc.status}: {exc.message}", file=sys.stderr)
        if exc.status == 401:
            hint = (
                "the worker refused the key sent (from --api-key, LLMWORKER_API_KEY, "
                "ADMIN_KEYS or API_KEYS)"
                if args.api_key
                else "pass the worker's key with --api-key or LLMWORKER_API_KEY"
            )
            print(f"llmworker: {hint}", file=sys.stderr)
        return 1
    if isinstance(exc, LLMWorkerError):
        print(f"llmworker: {exc.message}", file=sys.stderr)
        return 1 if isinstance(exc, WorkerUnreachable) else EXIT_CONFIG
    if isinstance(exc, ModuleNotFoundError):
        print(
            f"llmworker {args.command} needs the server's dependencies ({exc.name} is missing): "
            "pip install 'llmworker[server]'",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    if isinstance(exc, httpx.InvalidURL):
        print(f"llmworker: --url {args.url!r} is not a valid URL: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"llmworker: {args.url}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1
