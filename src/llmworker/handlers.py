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
    from llmworker.context import TaskContext

HandlerFn = Callable[["TaskContext", Any], Awaitable[Any]]


@dataclass(frozen=True)
class Handler:
    name: str
    fn: HandlerFn
    input_model: type[BaseModel] | None = None
    model: str | None = None
    routes: dict[str, str] = field(default_factory=dict)
    # What the fields of its input are called in error messages.
    input_noun: str = "input field"

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
        input_noun: str = "input field",
    ) -> Callable[[HandlerFn], HandlerFn]:
        def register(fn: HandlerFn) -> HandlerFn:
            handler = Handler(
                name or fn.__name__, fn, input_model, model, dict(routes or {}), input_noun
            )
            self.add(handler)
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
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[Any] | None = None


class ChatInput(BaseModel):
    """The ``chat`` kind's input: OpenAI's chat completion parameters. The ones llmworker
    knows are checked here (strictly: a number is never read from a string); any other is
    passed to the provider as given, and the provider's refusal reported as its own.
    ``stream`` and ``stream_options`` are llmworker's: it always streams."""

    model_config = ConfigDict(extra="allow", strict=True)

    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    # Beyond any model's context window: a larger number is a mistake, not a request.
    max_tokens: int | None = Field(None, ge=1, le=10_000_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=10_000_000)
    n: int | None = Field(None, ge=1, le=128)
    response_format: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, int | float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = Field(None, min_length=1, max_length=32)
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None


@registry.task("chat", input_model=ChatInput, input_noun="chat parameter")
async def chat(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
    """One chat completion on the task's model, its text and reasoning streamed to the
    task's events."""
    params = dict(input)
    messages = params.pop("messages")
    # Always streamed (stream_body); what the caller said about it changes nothing.
    params.pop("stream", None)
    params.pop("stream_options", None)
    reply = await ctx.llm.chat(messages, **params)
    return reply.to_json()
