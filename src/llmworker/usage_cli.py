"""``llmworker usage``: what tasks used and cost, from ``GET /v1/usage`` (or the ledger's
entries, ``--entries``), as a table, JSON or CSV."""

from __future__ import annotations

import argparse
import csv
import sys
from typing import Any

import orjson

TOKEN_TYPES = ("input", "cached_input", "output", "reasoning")


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument(
        "--since", default="0d", help="first day: YYYY-MM-DD, or days before today (7d; 0d: today)"
    )
    c.add_argument("--until", help="last day: YYYY-MM-DD, or days back (default: today)")
    # The worker checks it (and names the choices): the client imports nothing of the server.
    c.add_argument("--group-by", default="day", help="one row per day, model, tier or user")
    c.add_argument("--user", help="only this user's tasks")
    c.add_argument("--tier", help="only this tier's tasks")
    c.add_argument("--model", help="only this model's runs")
    out = c.add_mutually_exclusive_group()
    out.add_argument("--csv", action="store_true", help="CSV on standard output")
    out.add_argument("--json", action="store_true", help="the JSON answer")
    c.add_argument(
        "--entries", action="store_true", help="the ledger's entries, one per finished attempt"
    )
    c.add_argument("--limit", type=int, default=10_000, help="--entries: at most this many")


def cmd_usage(args: argparse.Namespace) -> int:
    from llmworker.cli import _client

    query = {
        "since": args.since,
        "until": args.until,
        "user": args.user,
        "tier": args.tier,
        "model": args.model,
    }
    with _client(args) as client:
        if args.entries:
            found = client.usage_entries(limit=args.limit, **query)
            if found.get("truncated"):
                print(f"more entries match: the first {args.limit} are shown", file=sys.stderr)
            return _entries(found["entries"], args)
        answer = client.usage(group_by=args.group_by, **query)
    if args.json:
        sys.stdout.write(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    group = answer["group_by"]
    columns = [group, "attempts", "tasks", *TOKEN_TYPES, "cost_usd", "unpriced_attempts"]
    table = [_flat(row, group) for row in answer["rows"]]
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([row[c] for c in columns] for row in table)
        return 0
    table.append(_flat({**answer["total"], group: "total"}, group))
    print(f"usage {answer['from']} to {answer['to']} ({answer['timezone']}), by {group}")
    _print_table(columns, table)
    return 0


def _flat(row: dict[str, Any], group: str) -> dict[str, Any]:
    return {
        group: row.get(group, ""),
        "attempts": row["attempts"],
        "tasks": row["tasks"],
        **{t: row["tokens"][t] for t in TOKEN_TYPES},
        "cost_usd": f"{row['cost_usd']:.9f}",
        "unpriced_attempts": row["unpriced_attempts"],
    }


def _entries(rows: list[dict[str, Any]], args: argparse.Namespace) -> int:
    if args.json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    columns = ["at", "task", "tenant", "user", "tier", "kind", "model", "status",
               *TOKEN_TYPES, "cost_usd", "price_source", "estimated"]  # fmt: skip
    flat = [
        {**{k: v for k, v in e.items() if k != "tokens"}, **e["tokens"],
         "cost_usd": "" if e["cost_usd"] is None else f"{e['cost_usd']:.9f}",
         "estimated": "true" if e["estimated"] else "false"}
        for e in rows
    ]  # fmt: skip
    if args.csv:
        writer = csv.DictWriter(sys.stdout, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(flat)
        return 0
    _print_table(columns, flat)
    return 0


def _print_table(columns: list[str], rows: list[dict[str, Any]]) -> None:
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.rjust(w) if v[:1].isdigit() else v.ljust(w)
                        for v, w in zip(r, widths, strict=True)))  # fmt: skip
