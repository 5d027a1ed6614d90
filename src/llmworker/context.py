"""What a handler gets besides its input: :class:`TaskContext`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from llmworker.auth import DEFAULT_TENANT, public_id, unscoped
from llmworker.errors import HandlerError
from llmworker.events import EventWriter
from llmworker.providers import LLMClient, Providers
from llmworker.providers.stream import merge_usage
from llmworker.queue import Claimed

if TYPE_CHECKING:
    import openai

# Queues a follow-up task (its body, the tenant it belongs to); resolves to its id.
SubmitFn = Callable[[dict[str, Any], str], Awaitable[str]]


class TaskContext:
    """The running task (``id``, ``kind``, ``user``, ``tier``, ``model``, ``attempt``,
    ``metadata``), its model (``llm``), its events (``progress``) and follow-ups
    (``submit``)."""

    def __init__(
        self,
        claimed: Claimed,
        llm: LLMClient,
        events: EventWriter,
        submit: SubmitFn,
        providers: Providers | None = None,
    ) -> None:
        f = claimed.fields
        self.id = public_id(f["id"])
        self.tenant = f.get("tenant") or DEFAULT_TENANT
        self.kind = f.get("kind", "")
        self.user = unscoped(self.tenant, f.get("user", ""))
        self.tier = f.get("tier", "")
        self.model = f.get("model", "")
        self.attempt = int(f.get("attempts", 1))
        self.metadata: dict[str, Any] = orjson.loads(f["metadata"]) if f.get("metadata") else {}
        self.llm = llm
        self.events = events
        self._submit = submit
        self._providers = providers
        self.usage: dict[str, Any] = {}

    @property
    def openai(self) -> openai.AsyncOpenAI:
        """The official ``openai`` SDK's client for the task's provider (its base URL and
        key), for what :attr:`llm` does not cover; name ``ctx.llm.alias.model`` as the
        model. Its calls are not retried by llmworker, and they run inside the task's
        slots like any other."""
        if self._providers is None:
            raise HandlerError("ctx.openai is not available outside a worker.")
        return self._providers.openai(self.model)

    async def progress(
        self, fraction: float | None = None, message: str | None = None, **data: Any
    ) -> None:
        """Report progress (0..1 and/or a message) to the task's event stream."""
        body: dict[str, Any] = dict(data)
        if fraction is not None:
            body["progress"] = max(0.0, min(1.0, fraction))
        if message is not None:
            body["message"] = message
        await self.events.emit("progress", body)

    async def submit(self, kind: str, input: Any, **fields: Any) -> str:
        """Queue a follow-up task for the same user, tier and tenant; returns its id."""
        body = {"kind": kind, "input": input, "user": self.user, "tier": self.tier, **fields}
        return str(await self._submit(body, self.tenant))

    def add_usage(self, usage: dict[str, Any]) -> None:
        merge_usage(self.usage, usage)
