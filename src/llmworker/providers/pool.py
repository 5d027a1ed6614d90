"""One HTTP connection pool per provider, shared by every task of the process."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp

from llmworker import __version__
from llmworker.errors import ProviderError
from llmworker.providers.base import ChatBackend
from llmworker.providers.client import CallObserver, HoldFn, LLMClient
from llmworker.providers.direct import DirectBackend
from llmworker.providers.fake import FakeBackend
from llmworker.settings import FAKE_PROVIDER, Provider, Settings

if TYPE_CHECKING:
    import openai


class Providers:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._sdk_clients: dict[str, openai.AsyncOpenAI] = {}
        self._fake = FakeBackend(settings.fake_latency_ms, settings.fake_tokens)
        # Told of every provider call's outcome (metrics, provider health), and of a
        # limit the provider says is used up (the model is held until it resets).
        self.observe: CallObserver | None = None
        self.on_limit: HoldFn | None = None

    def backend(self, alias_name: str) -> ChatBackend:
        alias = self.settings.models[alias_name]
        provider = self.settings.providers[alias.provider]
        if provider.name == FAKE_PROVIDER:
            return self._fake
        if self.settings.provider_client == "openai":
            from llmworker.providers.sdk import OpenAIBackend

            return OpenAIBackend(alias, provider, self.openai(alias_name))
        session = self._sessions.get(provider.name)
        if session is None:
            session = self._sessions[provider.name] = self._session(provider)
        return DirectBackend(alias, provider, session)

    def _session(self, provider: Provider) -> aiohttp.ClientSession:
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            "User-Agent": f"llmworker/{__version__}",
        }
        if provider.api_key:
            headers["Authorization"] = f"Bearer {provider.api_key}"
        return aiohttp.ClientSession(
            headers=headers,
            # Every run may hold a stream open at once; idle connections are kept for
            # reuse, a dead keep-alive one is replaced by aiohttp before the request.
            connector=aiohttp.TCPConnector(
                limit=max(1000, self.settings.worker_concurrency),
                limit_per_host=0,
                keepalive_timeout=30,
            ),
            # A streamed answer may take minutes: the timeout is between two reads.
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=10, sock_read=self.settings.provider_timeout_s
            ),
            skip_auto_headers=("Accept-Encoding",),
        )

    def openai(self, alias_name: str) -> openai.AsyncOpenAI:
        """The official SDK's client for an alias's provider (imported on first use)."""
        alias = self.settings.models[alias_name]
        provider = self.settings.providers[alias.provider]
        if provider.name == FAKE_PROVIDER:
            raise ProviderError(
                f"The model {alias_name!r} is simulated in-process: it has no API for the "
                "openai SDK; point a provider at `llmworker fake-llm` instead.",
                code="provider_rejected",
            )
        client = self._sdk_clients.get(provider.name)
        if client is None:
            import httpx2
            import openai

            client = openai.AsyncOpenAI(
                api_key=provider.api_key or "none",
                base_url=provider.base_url,
                max_retries=0,  # retried here, within the task's deadline
                timeout=openai.Timeout(self.settings.provider_timeout_s, connect=10.0),
                # aiohttp moves bytes for about half the CPU of httpx.
                http_client=openai.DefaultAioHttpClient(
                    limits=httpx2.Limits(
                        max_connections=max(1000, self.settings.worker_concurrency),
                        max_keepalive_connections=200,
                    )
                ),
            )
            self._sdk_clients[provider.name] = client
        return client

    def client(
        self, alias_name: str, on_usage: Callable[[dict[str, Any]], None] | None = None
    ) -> LLMClient:
        alias = self.settings.models[alias_name]
        client = LLMClient(
            alias,
            self.settings.providers[alias.provider],
            self.backend(alias_name),
            on_usage,
            observe=self.observe,
        )
        client.on_limit = self.on_limit
        return client

    async def aclose(self) -> None:
        for session in self._sessions.values():
            await session.close()
        for client in self._sdk_clients.values():
            await client.close()
        self._sessions.clear()
        self._sdk_clients.clear()
