"""The in-process ``fake`` model: simulated latency and streaming, no network, so the
worker serves chat tasks out of the box. Given ``tools`` (and no ``tool_choice`` of
"none"), it calls the first one, as a model would."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from llmworker.providers.base import ChatBackend
from llmworker.providers.stream import ChatResult, Choice, Sink

WORDS = ["This", "is", "a", "simulated", "reply", "from", "the", "fake", "model", "to:"]


class FakeBackend(ChatBackend):
    def __init__(self, latency_ms: float, tokens: int) -> None:
        self.latency_s = latency_ms / 1000
        self.tokens = tokens

    async def complete(self, request: dict[str, Any], sink: Sink | None) -> ChatResult:
        messages = request.get("messages") or []
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        tool = _tool_to_call(request)
        if tool is not None:
            await asyncio.sleep(self.latency_s)
            call = {
                "id": "call_fake_0",
                "type": "function",
                "function": {"name": tool, "arguments": orjson.dumps({}).decode()},
            }
            choice = Choice("", "tool_calls", tool_calls=[call])
            return ChatResult("fake", _usage(prompt_tokens, 1), [choice])
        last = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
        prompt = last if isinstance(last, str) else str(last)
        words = [*WORDS, *prompt.split()[:200]]
        limit = request.get("max_completion_tokens") or request.get("max_tokens") or self.tokens
        while len(words) < self.tokens:
            words.append("lorem")
        words = words[: max(1, min(limit, self.tokens))] if self.tokens else []
        step = self.latency_s / max(1, len(words))
        if not words:
            await asyncio.sleep(self.latency_s)
        for i, word in enumerate(words):
            await asyncio.sleep(step)
            if sink is not None:
                sink.token(word if i == 0 else " " + word)
        choice = Choice(" ".join(words), "stop")
        return ChatResult("fake", _usage(prompt_tokens, len(words)), [choice])


def _tool_to_call(request: dict[str, Any]) -> str | None:
    tools = request.get("tools") or []
    choice = request.get("tool_choice")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict):
        named = (choice.get("function") or {}).get("name")
        if named:
            return str(named)
    first = tools[0] if isinstance(tools[0], dict) else {}
    return str((first.get("function") or {}).get("name") or "tool")


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
