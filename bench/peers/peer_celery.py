"""celery with the Redis broker and the threads pool; ``python -m celery -A peer_celery
worker -P threads -c N``. No result backend: celery's default, and the text is recorded
with the finish time as for every peer."""

# Runs in .venv-peers: llmworker's mypy has neither the peer libraries nor this folder.

from __future__ import annotations

from typing import Any

import peerlib
from celery import Celery
from celery.signals import worker_ready

app = Celery("peer_celery", broker=peerlib.REDIS_URL)
app.conf.update(task_ignore_result=True, broker_connection_retry_on_startup=True)


@worker_ready.connect
def ready(**_: Any) -> None:
    peerlib.ready_sync()


@app.task(name="llm")
def llm(i: int) -> str:
    return peerlib.run_sync(i)


def produce(n: int, clients: int) -> float:
    return peerlib.enqueue_threads(n, clients, llm.delay)
