"""llmworker: a self-hosted HTTP worker for slow LLM jobs.

Register task kinds with :func:`task`; handlers get a :class:`TaskContext`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from llmworker.executor import TaskContext
from llmworker.handlers import task

__all__ = ["TaskContext", "__version__", "task"]
