"""The LLM client a handler calls: OpenAI-compatible providers, and the in-process fake.

Two clients speak to a provider, chosen by ``PROVIDER_CLIENT``:

- ``direct`` (the default): OpenAI's chat completions protocol on one aiohttp session
  per provider. A streamed call costs about a third of the CPU and memory of the SDK's
  path, and the SDK's ~50 MB of type modules are never imported.
- ``openai``: the official ``openai`` SDK (``AsyncOpenAI`` on its aiohttp transport).

Provider errors are translated here, once, into :class:`~llmworker.errors.ProviderError`
with a message a person can act on, the same for both clients. Retryable ones (429,
5xx, timeouts, refused or dropped connections) are retried with exponential backoff and
full jitter; a provider's ``Retry-After`` wins over the backoff; no attempt starts after
the task's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import structlog

from llmworker import __version__
from llmworker.errors import ProviderError
from llmworker.settings import FAKE_PROVIDER, ModelAlias, Provider, Settings, env_token

if TYPE_CHECKING:
    import openai

log = structlog.get_logger("llmworker.llm")

TokenSink = Callable[[str], None]

BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
MAX_TRIES = 8  # per call, even when the deadline is far


@dataclass
class ChatResult:
    content: str
    model: str
    usage: dict[str, int] = field(default_factory=dict)
    finish_reason: str | None = None
    reasoning: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"content": self.content, "model": self.model, "usage": self.usage}
        if self.finish_reason:
            out["finish_reason"] = self.finish_reason
        if self.reasoning:
            out["reasoning"] = self.reasoning
        return out


# A Retry-After past this is treated as this: a misbehaving server cannot park work.
MAX_RETRY_AFTER_S = 3600.0


def retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from ``Retry-After-Ms`` or ``Retry-After`` (seconds or an HTTP date), within
    0..MAX_RETRY_AFTER_S; None when absent or not a finite number."""
    if headers is None:
        return None
    seconds: float | None = None
    if ms := headers.get("retry-after-ms"):
        with contextlib.suppress(ValueError):
            seconds = float(ms) / 1000
    raw = headers.get("retry-after")
    if seconds is None and raw:
        try:
            seconds = float(raw)
        except ValueError:
            with contextlib.suppress(TypeError, ValueError):
                seconds = parsedate_to_datetime(raw).timestamp() - time.time()
    if seconds is None or not math.isfinite(seconds):
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))


def status_error(
    status: int,
    detail: str,
    headers: Mapping[str, str] | None,
    alias: ModelAlias,
    provider: Provider,
) -> ProviderError:
    """One table from a provider's HTTP status to our errors, for both clients."""
    where = _where(alias, provider)
    retry_after = retry_after_s(headers)
    if status == 401:
        key_env = f"{env_token(provider.name)}_API_KEY"
        return ProviderError(
            f"{where} rejected the API key (401): check {key_env}.",
            code="provider_auth",
            status=status,
        )
    if status == 402:
        return ProviderError(
            f"{where} refused for billing (402): {detail}", code="provider_billing", status=status
        )
    if status == 403:
        return ProviderError(
            f"{where} denied access (403): {detail}", code="provider_forbidden", status=status
        )
    if status == 404:
        return ProviderError(
            f"{where} does not know the model {alias.model!r} (404): check the alias's model name.",
            code="provider_model_not_found",
            status=status,
        )
    if status == 429:
        return ProviderError(
            f"{where} is rate limiting (429): {detail}",
            code="provider_rate_limited",
            status=status,
            retryable=True,
            retry_after_s=retry_after,
        )
    if status >= 500 or status in (408, 409, 425):
        return ProviderError(
            f"{where} failed ({status}): {detail}",
            code="provider_unavailable",
            status=status,
            retryable=True,
            retry_after_s=retry_after,
        )
    return ProviderError(
        f"{where} refused the request ({status}): {detail}",
        code="provider_rejected",
        status=status,
    )


def timeout_error(alias: ModelAlias, provider: Provider) -> ProviderError:
    return ProviderError(
        f"{_where(alias, provider)} did not answer in time.",
        code="provider_timeout",
        retryable=True,
    )


def unreachable_error(root: object, alias: ModelAlias, provider: Provider) -> ProviderError:
    return ProviderError(
        f"Could not reach {_where(alias, provider)} at {provider.base_url}: {root}.",
        code="provider_unreachable",
        retryable=True,
    )


def translate(exc: Exception, alias: ModelAlias, provider: Provider) -> ProviderError:
    """Any exception of a provider call -> :class:`ProviderError`."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return timeout_error(alias, provider)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return unreachable_error(exc.os_error, alias, provider)
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        return ProviderError(
            f"{_where(alias, provider)} dropped the connection mid-answer: {exc}.",
            code="provider_disconnected",
            retryable=True,
        )
    if isinstance(exc, aiohttp.ClientError):
        return unreachable_error(exc, alias, provider)
    if type(exc).__module__.startswith("openai"):
        return _translate_sdk(exc, alias, provider)
    return ProviderError(
        f"{_where(alias, provider)} failed: {type(exc).__name__}: {exc}", code="provider_error"
    )


def _translate_sdk(exc: Exception, alias: ModelAlias, provider: Provider) -> ProviderError:
    import openai

    if isinstance(exc, openai.APIConnectionError):
        root = _root_cause(exc)
        # The SDK's aiohttp transport reports a refused connection as a connect
        # *timeout*: the root cause tells which it was.
        timed_out = isinstance(root, TimeoutError) or not isinstance(root, OSError)
        if isinstance(exc, openai.APITimeoutError) and timed_out:
            return timeout_error(alias, provider)
        return unreachable_error(root, alias, provider)
    if isinstance(exc, openai.APIStatusError):
        detail = _error_detail(exc.body) or str(exc.message)
        return status_error(exc.status_code, detail, exc.response.headers, alias, provider)
    return ProviderError(
        f"{_where(alias, provider)} failed: {type(exc).__name__}: {exc}", code="provider_error"
    )


def _where(alias: ModelAlias, provider: Provider) -> str:
    return f"{provider.name} ({alias.alias} -> {alias.model})"


def _root_cause(exc: BaseException) -> BaseException:
    for _ in range(10):
        if exc.__cause__ is None:
            break
        exc = exc.__cause__
    return exc


def _error_detail(body: object) -> str | None:
    """The message inside OpenAI's ``{"error": {"message": ...}}``, if there is one."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str) and inner:
            return inner
    return None


class ChatBackend:
    """One attempt at a chat completion, streamed."""

    async def complete(self, request: dict[str, Any], on_token: TokenSink | None) -> ChatResult:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


def _stream_body(request: dict[str, Any], model: str) -> dict[str, Any]:
    return {
        **request,
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


class DirectBackend(ChatBackend):
    """OpenAI's streamed chat completions on a shared aiohttp session."""

    def __init__(
        self, alias: ModelAlias, provider: Provider, session: aiohttp.ClientSession
    ) -> None:
        self.alias = alias
        self.provider = provider
        self.session = session
        self.url = provider.base_url.rstrip("/") + "/chat/completions"

    async def complete(self, request: dict[str, Any], on_token: TokenSink | None) -> ChatResult:
        body = orjson.dumps(_stream_body(request, self.alias.model))
        acc = _StreamAccumulator(self.alias.model, on_token)
        async with self.session.post(self.url, data=body) as response:
            if response.status >= 400:
                raw = await response.content.read(MAX_ERROR_BODY)
                raise status_error(
                    response.status, _detail(raw), response.headers, self.alias, self.provider
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
                            return acc.result()
                        acc.add(orjson.loads(payload))
        return acc.result()


MAX_ERROR_BODY = 64 * 1024


def _detail(raw: bytes) -> str:
    try:
        found = _error_detail(orjson.loads(raw))
    except orjson.JSONDecodeError:
        found = None
    if found:
        return found
    text = raw.decode("utf-8", "replace").strip()
    return text[:500] or "no details"


class OpenAIBackend(ChatBackend):
    """The same call through the official SDK (``PROVIDER_CLIENT=openai``)."""

    def __init__(self, alias: ModelAlias, provider: Provider, client: openai.AsyncOpenAI) -> None:
        self.alias = alias
        self.provider = provider
        self.client = client

    async def complete(self, request: dict[str, Any], on_token: TokenSink | None) -> ChatResult:
        from openai._constants import RAW_RESPONSE_HEADER
        from openai.types.chat import ChatCompletion

        # The SDK sends the request (auth, headers, timeouts) and maps HTTP errors to its
        # exceptions. Two of its costs are skipped, each about a millisecond of CPU per
        # call: the typed transform of the body (it is already plain JSON) and one
        # pydantic model per streamed chunk (the stream is read raw).
        acc = _StreamAccumulator(self.alias.model, on_token)
        raw = await self.client.post(
            "/chat/completions",
            cast_to=ChatCompletion,
            body=_stream_body(request, self.alias.model),
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
        return acc.result()


class _StreamAccumulator:
    """Folds OpenAI chat completion chunks into one :class:`ChatResult`."""

    def __init__(self, model: str, on_token: TokenSink | None) -> None:
        self.model = model
        self.on_token = on_token
        self.parts: list[str] = []
        self.reasoning: list[str] = []
        self.usage: dict[str, int] = {}
        self.finish_reason: str | None = None

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
            self.usage = {k: v for k, v in usage.items() if isinstance(v, int)}
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                self.parts.append(text)
                if self.on_token:
                    self.on_token(text)
            # DeepSeek's reasoner streams its chain of thought beside the answer.
            thought = delta.get("reasoning_content")
            if thought:
                self.reasoning.append(thought)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason

    def result(self) -> ChatResult:
        reasoning = "".join(self.reasoning) or None
        return ChatResult(
            "".join(self.parts), self.model, self.usage, self.finish_reason, reasoning
        )


class FakeBackend(ChatBackend):
    """The in-process ``fake`` model: simulated latency and streaming, no network, so the
    worker serves chat tasks out of the box."""

    def __init__(self, latency_ms: float, tokens: int) -> None:
        self.latency_s = latency_ms / 1000
        self.tokens = tokens

    async def complete(self, request: dict[str, Any], on_token: TokenSink | None) -> ChatResult:
        messages = request.get("messages") or []
        last = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
        prompt = last if isinstance(last, str) else str(last)
        words = ["This", "is", "a", "simulated", "reply", "from", "the", "fake", "model", "to:"]
        words += prompt.split()[:200]
        limit = request.get("max_tokens") or self.tokens
        while len(words) < self.tokens:
            words.append("lorem")
        words = words[: max(1, min(limit, self.tokens))] if self.tokens else []
        step = self.latency_s / max(1, len(words))
        if not words:
            await asyncio.sleep(self.latency_s)
        for i, word in enumerate(words):
            await asyncio.sleep(step)
            if on_token:
                on_token(word if i == 0 else " " + word)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        return ChatResult(" ".join(words), "fake", usage, "stop")


class Providers:
    """One HTTP connection pool per provider, shared by every task of the process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._sdk_clients: dict[str, openai.AsyncOpenAI] = {}
        self._fake = FakeBackend(settings.fake_latency_ms, settings.fake_tokens)

    def backend(self, alias_name: str) -> ChatBackend:
        alias = self.settings.models[alias_name]
        provider = self.settings.providers[alias.provider]
        if provider.name == FAKE_PROVIDER:
            return self._fake
        if self.settings.provider_client == "openai":
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
        self, alias_name: str, on_usage: Callable[[dict[str, int]], None] | None = None
    ) -> LLMClient:
        alias = self.settings.models[alias_name]
        return LLMClient(
            alias, self.settings.providers[alias.provider], self.backend(alias_name), on_usage
        )

    async def aclose(self) -> None:
        for session in self._sessions.values():
            await session.close()
        for client in self._sdk_clients.values():
            await client.close()
        self._sessions.clear()
        self._sdk_clients.clear()


class LLMClient:
    """What ``ctx.llm`` is: chat completions on the task's model, with retries."""

    def __init__(
        self,
        alias: ModelAlias,
        provider: Provider,
        backend: ChatBackend,
        on_usage: Callable[[dict[str, int]], None] | None = None,
        deadline: float | None = None,
        on_token: TokenSink | None = None,
    ) -> None:
        self.alias = alias
        self.provider = provider
        self.backend = backend
        self.on_usage = on_usage
        self.deadline = deadline
        self.on_token = on_token
        self.attempts = 0

    async def chat(
        self, messages: list[dict[str, Any]], *, stream_tokens: bool = True, **params: Any
    ) -> ChatResult:
        """A chat completion. Tokens stream to the task's events unless ``stream_tokens``
        is False; ``params`` are OpenAI's (temperature, max_tokens, response_format ...)."""
        request = {"messages": messages, **{k: v for k, v in params.items() if v is not None}}
        sink = self.on_token if stream_tokens else None
        tries = 0
        while True:
            tries += 1
            self.attempts += 1
            try:
                result = await self.backend.complete(request, sink)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                err = translate(exc, self.alias, self.provider)
                delay = self._delay(err, tries)
                if delay is None:
                    if err.retryable and tries > 1:
                        err.message = f"{err.message} (gave up after {tries} tries)"
                    raise err from exc
                log.warning(
                    "provider_retry",
                    model=self.alias.alias,
                    code=err.code,
                    tries=tries,
                    delay_s=round(delay, 3),
                )
                await asyncio.sleep(delay)
                continue
            if self.on_usage and result.usage:
                self.on_usage(result.usage)
            return result

    def _delay(self, err: ProviderError, tries: int) -> float | None:
        """Seconds to wait before the next try, or None to give up."""
        if not err.retryable or tries >= MAX_TRIES:
            return None
        backoff = random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (tries - 1)))
        delay = err.retry_after_s if err.retry_after_s is not None else backoff
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None
        return delay
