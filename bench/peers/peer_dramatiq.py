"""dramatiq with its Redis broker: threads; ``python -m dramatiq peer_dramatiq
--processes 1 --threads N``."""

# Runs in .venv-peers: llmworker's mypy has neither the peer libraries nor this folder.

from __future__ import annotations

from typing import Any

import dramatiq
import peerlib
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware


class Ready(Middleware):
    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        peerlib.ready_sync()


broker = RedisBroker(url=peerlib.REDIS_URL)
broker.add_middleware(Ready())
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="peers")
def llm(i: int) -> None:
    peerlib.run_sync(i)


def produce(n: int, clients: int) -> float:
    return peerlib.enqueue_threads(n, clients, llm.send)
