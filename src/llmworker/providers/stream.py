"""OpenAI's streamed chat completions, folded into one result as the chunks arrive.

Each chunk carries deltas per choice: text (``content``), the model's reasoning
(DeepSeek's ``reasoning_content``; ``reasoning`` on some gateways), tool calls in pieces
(``tool_calls[i].function.arguments`` split over many chunks), log probabilities, and
finally ``finish_reason``; with ``stream_options.include_usage`` the last chunk carries
the usage. Text and reasoning of the first choice go to the task's events as they
arrive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from llmworker.errors import ProviderError


class Sink(Protocol):
    """Where streamed text goes while a call runs (the task's events)."""

    def token(self, text: str) -> None: ...

    def reasoning(self, text: str) -> None: ...


@dataclass
class Choice:
    """One of the answers a call gives (``n`` > 1 asks for several)."""

    content: str = ""
    finish_reason: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    logprobs: list[Any] | None = None
    refusal: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"content": self.content}
        for name in ("finish_reason", "reasoning_content", "tool_calls", "logprobs", "refusal"):
            value = getattr(self, name)
            if value:
                out[name] = value
        return out


@dataclass
class ChatResult:
    """A chat completion: its choices (one unless ``n`` asked for more), read through
    the first one's fields (``content``, ``tool_calls`` ...)."""

    model: str
    usage: dict[str, Any]
    choices: list[Choice]
    # The provider said a limit is used up (x-ratelimit-remaining-* at 0): seconds until
    # it resets. The model is held that long (pause.lua), so nobody meets the 429.
    limit_reset_s: float | None = None

    @property
    def first(self) -> Choice:
        return self.choices[0] if self.choices else Choice()

    @property
    def content(self) -> str:
        return self.first.content

    @property
    def finish_reason(self) -> str | None:
        return self.first.finish_reason

    @property
    def reasoning_content(self) -> str | None:
        return self.first.reasoning_content

    @property
    def tool_calls(self) -> list[dict[str, Any]] | None:
        return self.first.tool_calls

    def to_json(self) -> dict[str, Any]:
        out = {"model": self.model, "usage": self.usage, **self.first.to_json()}
        if len(self.choices) > 1:
            out["choices"] = [c.to_json() for c in self.choices]
        return out


def stream_body(request: dict[str, Any], model: str) -> dict[str, Any]:
    """The request as sent: always streamed, with the usage in the last chunk."""
    return {
        **request,
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


class _Parts:
    """One choice while it streams."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.thought: list[str] = []
        self.refusal: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.logprobs: list[Any] = []
        self.finish_reason: str | None = None

    def add_tool_calls(self, deltas: list[dict[str, Any]]) -> None:
        for delta in deltas:
            call = self.calls.setdefault(
                int(delta.get("index") or 0),
                {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
            )
            if delta.get("id"):
                call["id"] = delta["id"]
            if delta.get("type"):
                call["type"] = delta["type"]
            fn = delta.get("function") or {}
            # The name comes once, the arguments in pieces.
            if fn.get("name") and not call["function"]["name"]:
                call["function"]["name"] = fn["name"]
            if fn.get("arguments"):
                call["function"]["arguments"] += fn["arguments"]

    def choice(self) -> Choice:
        return Choice(
            content="".join(self.text),
            finish_reason=self.finish_reason,
            reasoning_content="".join(self.thought) or None,
            tool_calls=[self.calls[i] for i in sorted(self.calls)] or None,
            logprobs=self.logprobs or None,
            refusal="".join(self.refusal) or None,
        )


class StreamAccumulator:
    """Folds chat completion chunks into one :class:`ChatResult`."""

    def __init__(self, model: str, sink: Sink | None) -> None:
        self.model = model
        self.sink = sink
        self.usage: dict[str, Any] = {}
        self.parts: dict[int, _Parts] = {}

    def add(self, chunk: dict[str, Any]) -> None:
        if "error" in chunk:  # some providers report a failure inside a 200 stream
            err = chunk["error"]
            message = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            raise ProviderError(
                f"The provider failed mid-stream: {message}",
                code="provider_stream_error",
                retryable=True,
            )
        self.model = chunk.get("model") or self.model
        usage = chunk.get("usage")
        if usage:
            self.usage = usage
        for choice in chunk.get("choices") or ():
            index = int(choice.get("index") or 0)
            parts = self.parts.get(index)
            if parts is None:
                parts = self.parts[index] = _Parts()
            delta = choice.get("delta") or {}
            # Only the first choice streams to the events: a reader follows one answer.
            sink = self.sink if index == 0 else None
            text = delta.get("content")
            if text:
                parts.text.append(text)
                if sink is not None:
                    sink.token(text)
            thought = delta.get("reasoning_content") or delta.get("reasoning")
            if thought and isinstance(thought, str):
                parts.thought.append(thought)
                if sink is not None:
                    sink.reasoning(thought)
            if delta.get("refusal"):
                parts.refusal.append(delta["refusal"])
            if delta.get("tool_calls"):
                parts.add_tool_calls(delta["tool_calls"])
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict) and logprobs.get("content"):
                parts.logprobs.extend(logprobs["content"])
            parts.finish_reason = choice.get("finish_reason") or parts.finish_reason

    def result(self) -> ChatResult:
        choices = [self.parts[i].choice() for i in sorted(self.parts)] or [Choice()]
        return ChatResult(self.model, self.usage, choices)


def merge_usage(total: dict[str, Any], usage: dict[str, Any]) -> None:
    """Add one call's usage to a task's: numbers summed, nested details
    (``prompt_tokens_details.cached_tokens`` ...) merged the same way."""
    for key, value in usage.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            total[key] = total.get(key, 0) + value
        elif isinstance(value, dict):
            inner = total.get(key)
            if not isinstance(inner, dict):
                inner = total[key] = {}
            merge_usage(inner, value)
