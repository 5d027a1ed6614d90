"""What every way of calling a provider offers: one attempt at a streamed chat
completion."""

from __future__ import annotations

from typing import Any

from llmworker.providers.stream import ChatResult, Sink


class ChatBackend:
    """One attempt at a chat completion, streamed to ``sink`` (when given)."""

    async def complete(self, request: dict[str, Any], sink: Sink | None) -> ChatResult:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None
