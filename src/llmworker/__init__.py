"""llmworker: a self-hosted HTTP worker for slow LLM jobs.

Register task kinds with :func:`task`; handlers get a :class:`TaskContext`. Both are
imported on first use, so ``import llmworker.client`` (an app that only calls a worker)
loads none of the server's dependencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from llmworker.context import TaskContext
    from llmworker.handlers import task

__all__ = ["TaskContext", "__version__", "task"]


def __getattr__(name: str) -> Any:
    if name == "TaskContext":
        from llmworker.context import TaskContext

        return TaskContext
    if name == "task":
        from llmworker.handlers import task

        return task
    raise AttributeError(f"module 'llmworker' has no attribute {name!r}")
