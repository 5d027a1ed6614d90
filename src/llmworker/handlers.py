"""Task kinds: a registry of handlers, and the built-in ``chat``.

A handler is ``async def handler(ctx, input) -> result`` registered with :func:`task`::

    from llmworker import task, TaskContext

    @task("summarize", model="ds-chat")
    async def summarize(ctx: TaskContext, input: dict) -> dict:
        reply = await ctx.llm.chat([{"role": "user", "content": input["text"]}])
        return {"summary": reply.content}

Modules named in ``TASK_MODULES`` (comma separated) are imported at start-up, so their
decorators run. The result must be JSON-serialisable.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmworker.errors import ConfigError
from llmworker.record import KIND_RE

if TYPE_CHECKING:
    from llmworker.executor import TaskContext

HandlerFn = Callable[["TaskContext", Any], Awaitable[Any]]


@dataclass(frozen=True)
class Handler:
    name: str
    fn: HandlerFn
    input_model: type[BaseModel] | None = None
    model: str | None = None
    routes: dict[str, str] = field(default_factory=dict)

    def model_for(self, tier: str) -> str | None:
        """The model alias this kind uses for a tier when the task names none."""
        return self.routes.get(tier, self.model)


class Registry:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def add(self, handler: Handler) -> None:
        if not KIND_RE.match(handler.name):
            raise ValueError(
                f"task kind {handler.name!r}: use letters, digits, '_', '.' or '-' (at most 64)"
            )
        self._handlers[handler.name] = handler

    def get(self, name: str) -> Handler | None:
        return self._handlers.get(name)

    @property
    def names(self) -> list[str]:
        return sorted(self._handlers)

    def task(
        self,
        name: str | None = None,
        *,
        input_model: type[BaseModel] | None = None,
        model: str | None = None,
        routes: dict[str, str] | None = None,
    ) -> Callable[[HandlerFn], HandlerFn]:
        def register(fn: HandlerFn) -> HandlerFn:
            self.add(Handler(name or fn.__name__, fn, input_model, model, dict(routes or {})))
            return fn

        return register


registry = Registry()
task = registry.task


def import_task_modules(spec: str) -> None:
    """Import every module of ``TASK_MODULES``; one problem line per module that fails.
    The working folder is importable, as for ``python -m``: ``TASK_MODULES=myapp.tasks``
    finds ``./myapp/tasks.py``."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    problems = []
    for name in (m.strip() for m in spec.split(",")):
        if not name:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:
            problems.append(f"TASK_MODULES: cannot import {name!r}: {type(exc).__name__}: {exc}")
    if problems:
        raise ConfigError(problems)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[Any] | None = None


class ChatInput(BaseModel):
    """The ``chat`` kind's input: OpenAI's chat completion parameters."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    response_format: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)


@registry.task("chat", input_model=ChatInput)
async def chat(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
    """One chat completion on the task's model, its tokens streamed to the task's events."""
    params = dict(input)
    messages = params.pop("messages")
    reply = await ctx.llm.chat(messages, **params)
    return reply.to_json()
