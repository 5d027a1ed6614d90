"""``python -m produce PEER N CLIENTS``: enqueue N tasks on a peer's queue from CLIENTS
concurrent enqueuers; prints when the first enqueue began and how long enqueueing took."""

# Runs in .venv-peers: llmworker's mypy has neither the peer libraries nor this folder.

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys
import time

import orjson


def main() -> None:
    peer, n, clients = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    module = importlib.import_module(f"peer_{peer}")
    if inspect.iscoroutinefunction(module.produce):
        started = asyncio.run(module.produce(n, clients))
    else:
        started = module.produce(n, clients)
    ended = time.time()
    sys.stdout.write(
        orjson.dumps({"first_enqueue": started, "enqueued_s": ended - started}).decode()
    )


if __name__ == "__main__":
    main()
