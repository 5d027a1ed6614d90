"""``PROVIDER_CLIENT=openai``: the same call through the official ``openai`` SDK
(``AsyncOpenAI`` on its aiohttp transport), imported only when used."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from llmworker.providers.base import ChatBackend
from llmworker.providers.errors import limit_reset_s
from llmworker.providers.stream import ChatResult, Sink, StreamAccumulator, stream_body
from llmworker.settings import ModelAlias, Provider

if TYPE_CHECKING:
    import openai


class OpenAIBackend(ChatBackend):
    def __init__(self, alias: ModelAlias, provider: Provider, client: openai.AsyncOpenAI) -> None:
        self.alias = alias
        self.provider = provider
        self.client = client

    async def complete(self, request: dict[str, Any], sink: Sink | None) -> ChatResult:
        from openai._constants import RAW_RESPONSE_HEADER
        from openai.types.chat import ChatCompletion

        # The SDK sends the request (auth, headers, timeouts) and maps HTTP errors to its
        # exceptions. Two of its costs are skipped, each about a millisecond of CPU per
        # call: the typed transform of the body (it is already plain JSON) and one
        # pydantic model per streamed chunk (the stream is read raw).
        acc = StreamAccumulator(self.alias.model, sink)
        raw = await self.client.post(
            "/chat/completions",
            cast_to=ChatCompletion,
            body=stream_body(request, self.alias.model),
            options={"headers": {RAW_RESPONSE_HEADER: "stream"}},
        )
        try:
            async for line in raw.iter_lines():  # type: ignore[attr-defined]
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                acc.add(orjson.loads(data))
        finally:
            await raw.close()  # type: ignore[attr-defined]
        result = acc.result()
        result.limit_reset_s = limit_reset_s(raw.headers)  # type: ignore[attr-defined]
        return result
