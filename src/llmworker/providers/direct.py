"""``PROVIDER_CLIENT=direct`` (the default): OpenAI's chat completions protocol on one
aiohttp session per provider. A streamed call costs about a third of the CPU and memory
of the SDK's path, and the SDK's ~50 MB of type modules are never imported."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from llmworker.providers.base import ChatBackend
from llmworker.providers.errors import MAX_ERROR_BODY, body_detail, limit_reset_s, status_error
from llmworker.providers.stream import ChatResult, Sink, StreamAccumulator, stream_body
from llmworker.settings import ModelAlias, Provider


class DirectBackend(ChatBackend):
    """OpenAI's streamed chat completions on a shared aiohttp session."""

    def __init__(
        self, alias: ModelAlias, provider: Provider, session: aiohttp.ClientSession
    ) -> None:
        self.alias = alias
        self.provider = provider
        self.session = session
        self.url = provider.base_url.rstrip("/") + "/chat/completions"

    async def complete(self, request: dict[str, Any], sink: Sink | None) -> ChatResult:
        body = orjson.dumps(stream_body(request, self.alias.model))
        acc = StreamAccumulator(self.alias.model, sink)
        async with self.session.post(self.url, data=body) as response:
            if response.status >= 400:
                raw = await response.content.read(MAX_ERROR_BODY)
                raise status_error(
                    response.status, body_detail(raw), response.headers, self.alias, self.provider
                )
            # Server-sent events, read as the bytes arrive and split into lines here:
            # aiohttp's readline costs several calls per line. Only ``data:`` lines
            # carry chunks.
            rest = b""
            async for data in response.content.iter_any():
                lines = (rest + data).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    if line.startswith(b"data:"):
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            return _with_limits(acc.result(), response.headers)
                        acc.add(orjson.loads(payload))
        return _with_limits(acc.result(), response.headers)


def _with_limits(result: ChatResult, headers: Mapping[str, str]) -> ChatResult:
    result.limit_reset_s = limit_reset_s(headers)
    return result
