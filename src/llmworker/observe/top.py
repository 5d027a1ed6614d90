"""``llmworker top``: the dashboard's numbers in the terminal, redrawn every second.

:func:`render` turns one ``GET /v1/stats`` answer into a rich renderable and does
nothing else; :func:`watch` is the loop around it and :func:`top` what the command
runs. A worker older than the ``lanes``, ``throughput``, ``providers``,
``running_tasks`` and ``now`` fields gets what its answer allows: lanes derived from
``queues`` and ``guards``, and no throughput, providers or running tasks. A field that
is missing or of the wrong type is shown as ``-``, never an error.

Client side: imports rich and the HTTP client, none of the server's packages.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

import httpx
from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from llmworker.client import ApiError
from llmworker.errors import LLMWorkerError

# A worker that hangs shows as an error line within seconds, not as a frozen screen.
REQUEST_TIMEOUT_S = 5.0
# One character per minute; zero is a blank, anything above zero at least the lowest block.
BLOCKS = "▁▂▃▄▅▆▇█"
BAR_WIDTH = 8

Stats = dict[str, Any]
Fetch = Callable[[], Stats]


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _count(value: Any) -> str:
    n = _num(value)
    return "-" if n is None else str(int(n))


def format_wait(seconds: Any) -> str:
    """A wait or a run time: ``12s``, ``3m05s``, ``1h02m``; ``-`` when unknown."""
    n = _num(seconds)
    if n is None or n < 0:
        return "-"
    s = int(n)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_duration(seconds: Any) -> str:
    """A provider call's duration: ``850ms``, ``4.2s``, ``12s``, ``3m05s``."""
    n = _num(seconds)
    if n is None or n < 0:
        return "-"
    if n < 1:
        return f"{n * 1000:.0f}ms"
    if n < 10:
        return f"{n:.1f}s"
    return f"{n:.0f}s" if n < 60 else format_wait(n)


def sparkline(values: Sequence[float], top: float | None = None) -> str:
    """One block per value, scaled to ``top`` (default: the largest value)."""
    top = top if top is not None else max(values, default=0)
    if top <= 0:
        return " " * len(values)
    return "".join(
        " " if v <= 0 else BLOCKS[min(len(BLOCKS), math.ceil(v / top * len(BLOCKS))) - 1]
        for v in values
    )


def bar(used: Any, limit: Any, width: int = BAR_WIDTH) -> Text:
    """``2/5 ███░░░░░``: slots in use of the limit, the bar red when full."""
    n, cap = _num(used), _num(limit)
    label = f"{_count(used)}/{_count(limit)}"
    if n is None or cap is None or cap <= 0:
        return Text(label)
    filled = min(width, round(width * n / cap))
    style = "red" if n >= cap else "yellow" if n / cap >= 0.7 else "green"
    text = Text(f"{label:>5} ")
    text.append("█" * filled, style=style)
    text.append("░" * (width - filled), style="dim")
    return text


def _cell(value: Any) -> Text:
    """A table cell on one line: cut with an ellipsis when the terminal is narrow."""
    return Text(
        "-" if value is None or value == "" else str(value), no_wrap=True, overflow="ellipsis"
    )


def _table(title: str) -> Table:
    return Table(
        title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD, show_edge=False
    )


def _local_time(iso: Any) -> str | None:
    if not isinstance(iso, str):
        return None
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%H:%M:%S")
    except ValueError:
        return None


def lanes(stats: Stats) -> list[dict[str, Any]]:
    """One row per tier and model: the worker's ``lanes``, else (an older worker) tier x
    model from ``guards`` with the waiting counts of ``queues`` (no oldest wait)."""
    given = stats.get("lanes")
    if isinstance(given, list):
        return [_dict(lane) for lane in given]
    queues, guards = _dict(stats.get("queues")), _dict(stats.get("guards"))
    tiers = list(queues)
    for guard in guards.values():
        tiers += [t for t in _dict(_dict(guard).get("tiers")) if t not in tiers]
    rows = []
    for tier in tiers:
        waiting = _dict(_dict(queues.get(tier)).get("models"))
        for model in [*guards, *(m for m in waiting if m not in guards)]:
            slot = _dict(_dict(_dict(guards.get(model)).get("tiers")).get(tier))
            rows.append(
                {
                    "tier": tier,
                    "model": model,
                    "waiting": waiting.get(model, 0),
                    "running": slot.get("in_use"),
                    "limit": slot.get("limit"),
                }
            )
    return rows


def _header(stats: Stats, url: str, error: str | None, clock: datetime | None) -> Group:
    shown = _local_time(stats.get("now")) or (clock.strftime("%H:%M:%S") if clock else "-")
    line = Text()
    line.append("llmworker top", style="bold")
    for label, value in (
        ("", url),
        ("replicas alive ", _count(stats.get("replicas_alive"))),
        ("running ", _count(stats.get("running"))),
        ("callbacks waiting ", _count(stats.get("callbacks_waiting"))),
        ("", shown),
    ):
        line.append("  " + label)
        line.append(value, style="bold")
    lines = [line]
    for key, label, style, show in (
        ("held", "held (the provider asked to wait)", "yellow", _held),
        ("circuits", "circuits (no calls go out)", "bold red", _circuit),
        ("adaptive_caps", "adaptive caps (the provider pushed back)", "cyan", _cap),
    ):
        per_model = stats.get(key)
        if isinstance(per_model, dict) and per_model:
            shown_models = ", ".join(
                text for model, v in sorted(per_model.items()) if (text := show(model, v))
            )
            lines.append(Text(f"{label}: {shown_models}", style=style))
    if error is not None:
        lines.append(Text(f"! {error}", style="bold red"))
    return Group(*lines)


# What the header says of one model, per kind of provider state ('' to leave it out).
def _held(model: str, seconds: Any) -> str:
    return f"{model} {format_wait(seconds)}" if isinstance(seconds, int | float) else ""


def _circuit(model: str, c: Any) -> str:
    return f"{model} {c.get('state', '?')} ({c.get('code', '?')})" if isinstance(c, dict) else ""


def _cap(model: str, c: Any) -> str:
    return f"{model} {c.get('cap')}/{c.get('max')}" if isinstance(c, dict) else ""


def _lanes(stats: Stats) -> Table | Text:
    rows = lanes(stats)
    if not rows:
        return Text("Lanes: none reported", style="dim")
    table = _table("Lanes")
    table.add_column("tier")
    table.add_column("model")
    table.add_column("waiting", justify="right")
    table.add_column("running/limit", no_wrap=True)
    table.add_column("oldest wait", justify="right")
    for lane in rows:
        table.add_row(
            _cell(lane.get("tier")),
            _cell(lane.get("model")),
            _count(lane.get("waiting")),
            bar(lane.get("running"), lane.get("limit")),
            format_wait(lane.get("oldest_wait_s")),
        )
    return table


class _Wide:
    """``wide`` where the width allows it, else ``narrow``."""

    def __init__(self, wide: Table, narrow: RenderableType) -> None:
        self.wide, self.narrow = wide, narrow

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        unbounded = options.update_width(10_000)
        fits = Measurement.get(console, unbounded, self.wide).maximum <= options.max_width
        yield self.wide if fits else self.narrow


def _throughput(stats: Stats) -> _Wide | None:
    data = _dict(stats.get("throughput"))
    if not data:
        return None
    series = {
        name: [_num(v) or 0.0 for v in _list(data.get(name))]
        for name in ("succeeded", "failed", "cancelled")
    }
    minutes = max(len(values) for values in series.values())
    minute_s = _num(data.get("minute_s")) or 60
    span = f"{minutes * minute_s / 60:g} min"
    # The sparklines share one scale: a bad minute stands out against a good one.
    scale = max([*series["succeeded"], *series["failed"]], default=0)
    sparks = {
        name: Text(sparkline(series[name], scale).ljust(minutes), style=f"{style} on grey15")
        for name, style in (("succeeded", "green"), ("failed", "red"))
    }
    axis = Text(f"{span} ago".ljust(max(0, minutes - 3)) + "now", style="dim")
    # Wide: the sparklines beside the counts; narrow: under them.
    wide, counts = _table("Throughput"), _table("Throughput")
    for table in (wide, counts):
        table.add_column("")
        table.add_column("this minute", justify="right")
        table.add_column(f"last {span}", justify="right")
    wide.add_column(axis, no_wrap=True)
    lines = Table.grid(padding=(0, 1))
    lines.add_column(no_wrap=True)
    lines.add_column(no_wrap=True)
    for name, values in series.items():
        if not values and name == "cancelled":
            continue
        row = [name, str(int(values[-1])) if values else "-", str(int(sum(values)))]
        counts.add_row(*row)
        wide.add_row(*row, sparks.get(name, ""))
        if name in sparks:
            lines.add_row(f" {name:<9}", sparks[name])
    lines.add_row("", axis)
    return _Wide(wide, Group(counts, Text(""), lines))


PROVIDER_COUNTS = (
    ("ok", "ok", ""),
    ("rate_limited", "429", "yellow"),
    ("server_error", "5xx", "red"),
    ("timeout", "timeout", "red"),
    ("client_error", "4xx", "red"),
)
PROVIDER_TIMES = (
    ("duration_p50_s", "p50"),
    ("duration_p95_s", "p95"),
    ("ttft_p50_s", "TTFT p50"),
    ("ttft_p95_s", "TTFT p95"),
)


def _providers(stats: Stats) -> Table | Text | None:
    if "providers" not in stats:
        return None
    providers = _dict(stats.get("providers"))
    if not providers:
        return Text("Provider health: no provider calls recorded lately", style="dim")
    windows = {_num(_dict(p).get("window_s")) for p in providers.values()} - {None}
    window = ""
    if len(windows) == 1:
        window_s = windows.pop() or 0
        minutes = f"{window_s / 60:g} min" if window_s % 60 == 0 else format_wait(window_s)
        window = f" (last {minutes})"
    table = _table(f"Provider health{window}")
    table.add_column("model")
    for _, label, _ in PROVIDER_COUNTS:
        table.add_column(label, justify="right")
    for _, label in PROVIDER_TIMES:
        table.add_column(label, justify="right")
    for model, health in providers.items():
        health = _dict(health)
        requests = _dict(health.get("requests"))
        counts = [
            Text(_count(requests.get(key)), style=style if _num(requests.get(key)) else "")
            for key, _, style in PROVIDER_COUNTS
        ]
        times = [format_duration(health.get(key)) for key, _ in PROVIDER_TIMES]
        table.add_row(_cell(model), *counts, *times)
    return table


RUNNING_COLUMNS = ("id", "tenant", "kind", "tier", "model", "user")


def _running(stats: Stats, rows: int | None) -> Table | Text | None:
    if "running_tasks" not in stats:
        return None
    tasks = [_dict(t) for t in _list(stats.get("running_tasks"))]
    total = max(len(tasks), int(_num(stats.get("running")) or 0))
    shown = tasks if rows is None else tasks[: max(0, rows)]
    if not tasks:
        return Text("Running tasks: none", style="dim")
    if not shown:
        return Text(f"Running tasks ({total}): the terminal is too short to list them")
    count = f"{total}" if len(shown) == total else f"{len(shown)} of {total}"
    table = _table(f"Running tasks ({count})")
    for name in RUNNING_COLUMNS:
        table.add_column(name)
    table.add_column("attempt", justify="right", no_wrap=True)
    table.add_column("running for", justify="right", no_wrap=True)
    for task in shown:
        table.add_row(
            *(_cell(task.get(name)) for name in RUNNING_COLUMNS),
            _count(task.get("attempts")),
            format_wait(task.get("run_s")),
        )
    return table


def render(
    stats: Stats,
    *,
    url: str,
    error: str | None = None,
    clock: datetime | None = None,
    running_rows: int | None = None,
) -> RenderableType:
    """One frame from a ``/v1/stats`` answer (``{}`` before the first one): the header
    (with ``error`` under it), lanes, throughput, provider health and up to
    ``running_rows`` running tasks (all when None). ``clock`` is the time shown when
    the answer has no ``now``."""
    parts: list[RenderableType] = [_header(stats, url, error, clock)]
    if stats:
        sections = (
            _lanes(stats),
            _throughput(stats),
            _providers(stats),
            _running(stats, running_rows),
        )
        for section in sections:
            if section is not None:
                parts += [Text(""), section]
    return Group(*parts)


def _height(console: Console, renderable: RenderableType) -> int:
    return len(console.render_lines(renderable, console.options, pad=False))


def fit(console: Console, stats: Stats, **options: Any) -> RenderableType:
    """:func:`render` with as many running tasks as the terminal's height leaves room for."""
    frame = render(stats, **options)
    tasks = len(_list(stats.get("running_tasks")))
    height = console.size.height
    if tasks <= 1 or _height(console, frame) <= height:
        return frame
    # Every task is one line (the columns do not wrap): measure with one, add the rest.
    spare = height - _height(console, render(stats, running_rows=1, **options))
    return render(stats, running_rows=max(0, min(tasks, 1 + spare)), **options)


def describe(exc: Exception) -> str:
    """The error line for a failed fetch."""
    if isinstance(exc, ApiError):
        hint = {
            401: ": pass the worker's key with --api-key or LLMWORKER_API_KEY",
            403: ": this needs an admin key",
        }.get(exc.status, "")
        return f"the worker answered {exc.status}: {exc.message}{hint}"
    if isinstance(exc, LLMWorkerError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def _ignoring_sigint() -> Iterator[None]:
    """SIGINT ignored inside (the main thread only can change it; elsewhere, no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def watch(fetch: Fetch, console: Console, *, url: str, interval_s: float = 1.0) -> None:
    """Fetch and redraw every ``interval_s`` until Ctrl+C, which returns normally. A
    failed fetch is an error line over the last numbers, and the loop carries on. On a
    terminal the frame is redrawn in place on the alternate screen (restored at the
    end); otherwise each frame is printed after the previous one."""
    last: Stats = {}
    fetched_at: datetime | None = None
    # ``after`` is left last: a second Ctrl+C is ignored while the screen is restored.
    with contextlib.ExitStack() as after, contextlib.ExitStack() as screen:
        try:
            live = None
            if console.is_terminal:
                live = screen.enter_context(
                    Live(console=console, screen=True, auto_refresh=False, redirect_stderr=False)
                )
            while True:
                started = time.monotonic()
                error = None
                try:
                    last, fetched_at = fetch(), datetime.now()
                except (LLMWorkerError, httpx.HTTPError, ValueError) as exc:
                    error = f"{datetime.now():%H:%M:%S} {describe(exc)}"
                    if fetched_at is not None:
                        error += f" (the numbers below are from {fetched_at:%H:%M:%S})"
                options: dict[str, Any] = {"url": url, "error": error, "clock": fetched_at}
                if live is not None:
                    live.update(fit(console, last, **options), refresh=True)
                else:
                    console.print(render(last, **options), "")
                time.sleep(max(0.0, started + interval_s - time.monotonic()))
        except KeyboardInterrupt:
            after.enter_context(_ignoring_sigint())


def top(fetch: Fetch, *, url: str, interval_s: float = 1.0, once: bool = False) -> None:
    """What ``llmworker top`` runs: one frame (``once``: errors are raised), or the loop."""
    # Into a pipe or a file rich would assume 80 columns: COLUMNS, else a wide frame.
    console = Console() if sys.stdout.isatty() or os.environ.get("COLUMNS") else Console(width=140)
    if once:
        console.print(render(fetch(), url=url, clock=datetime.now()))
        return
    watch(fetch, console, url=url, interval_s=interval_s)
