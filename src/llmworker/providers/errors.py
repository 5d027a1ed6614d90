"""Provider failures, translated once: every exception of a provider call, from either
client, becomes a :class:`~llmworker.errors.ProviderError` with a message a person can
act on, and says whether retrying can help and when (``Retry-After``)."""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

import aiohttp
import orjson

from llmworker.errors import ProviderError
from llmworker.settings import ModelAlias, Provider, env_token

# A Retry-After past this is treated as this: a misbehaving server cannot park work.
MAX_RETRY_AFTER_S = 3600.0
# The part of an error answer read for its message.
MAX_ERROR_BODY = 64 * 1024


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


# OpenAI's insufficient_quota ("You exceeded your current quota ..") and Gemini's per-day
# limits ("Quota exceeded for quota metric '.. per day'", quota ids ending PerDay); a
# per-minute limit (Gemini's "Resource has been exhausted (e.g. check quota)") is not this.
QUOTA_RE = re.compile(
    r"insufficient_quota|exceeded your current quota|per ?day|PerDay", re.IGNORECASE
)
# The prompt does not fit the model's context window (OpenAI's context_length_exceeded,
# DeepSeek's and vLLM's "maximum context length", Gemini's "exceeds the maximum number
# of tokens", Anthropic-style "prompt is too long").
CONTEXT_RE = re.compile(
    r"context_length_exceeded|context length|context window|maximum number of tokens"
    r"|prompt is too long|too many tokens|reduce the length",
    re.IGNORECASE,
)
# Errors whose cause is the account or the key, not the call: the model's circuit opens.
CIRCUIT_CODES = frozenset(
    {"provider_auth", "provider_forbidden", "provider_billing", "provider_quota"}
)
DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def _duration_s(raw: str) -> float | None:
    """OpenAI's reset durations: ``1s``, ``6m0s``, ``120ms``, ``1h2m3.5s``."""
    parts = DURATION_RE.findall(raw.strip())
    if not parts or "".join(n + u for n, u in parts) != raw.strip():
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def limit_reset_s(headers: Mapping[str, str] | None) -> float | None:
    """How long until a limit the provider says is used up resets: OpenAI's
    ``x-ratelimit-remaining-{requests,tokens}`` at 0 and their ``x-ratelimit-reset-*``
    (the longest, within 0..MAX_RETRY_AFTER_S); None when no limit is used up."""
    if headers is None:
        return None
    longest: float | None = None
    for kind in ("requests", "tokens"):
        if headers.get(f"x-ratelimit-remaining-{kind}", "").strip() != "0":
            continue
        reset = _duration_s(headers.get(f"x-ratelimit-reset-{kind}", ""))
        if reset is not None and (longest is None or reset > longest):
            longest = reset
    return None if longest is None else min(MAX_RETRY_AFTER_S, longest)


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
        return _not_found(detail, alias, provider)
    if status in (400, 413, 422) and CONTEXT_RE.search(detail):
        return ProviderError(
            f"{where} cannot take a prompt this long ({status}): {detail}",
            code="provider_context_exceeded",
            status=status,
        )
    if status == 429 and QUOTA_RE.search(detail):
        # Out of quota, not out of breath: retrying cannot help until the plan changes.
        return ProviderError(
            f"{where} says the account is out of quota (429): {detail}",
            code="provider_quota",
            status=status,
        )
    if status == 429:
        return ProviderError(
            f"{where} is rate limiting (429): {detail}",
            code="provider_rate_limited",
            status=status,
            retryable=True,
            retry_after_s=retry_after if retry_after is not None else limit_reset_s(headers),
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


def _not_found(detail: str, alias: ModelAlias, provider: Provider) -> ProviderError:
    """A 404 that names a model is the provider's "no such model" (OpenAI, vLLM, Ollama
    all say so in the body); any other 404 means the URL is wrong: nothing answers the
    chat completions path there."""
    where = _where(alias, provider)
    if "model" in detail.lower():
        return ProviderError(
            f"{where} does not know the model {alias.model!r} (404: {detail}): check the "
            "alias's model name.",
            code="provider_model_not_found",
            status=404,
        )
    return ProviderError(
        f"{where}: {provider.base_url.rstrip('/')}/chat/completions answered 404 ({detail}): "
        f"check {env_token(provider.name)}_BASE_URL (OpenAI-compatible APIs usually end in /v1).",
        code="provider_url_not_found",
        status=404,
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


def fallback_reason(err: ProviderError) -> str:
    """Which way a task goes when its call failed before anything came back: the error's
    class as routes see it. ``rate_limited`` (the next model with room now),
    ``circuit_open`` (a refused key or an exhausted quota: the same, and the model's
    circuit opens), ``unavailable`` (5xx, timeouts after their retries: the next model),
    ``context`` (the next model with a larger context), or ``""`` (the task fails)."""
    if err.code == "provider_rate_limited":
        return "rate_limited"
    if err.code in CIRCUIT_CODES:
        return "circuit_open"
    if err.code == "provider_context_exceeded":
        return "context"
    if err.retryable:
        return "unavailable"
    return ""


def outcome_of(err: ProviderError) -> str:
    """The metrics' name for how a call failed: rate_limited, timeout, server_error (the
    provider failed or could not be reached) or client_error (it refused the request)."""
    if err.code == "provider_rate_limited":
        return "rate_limited"
    if err.code == "provider_timeout":
        return "timeout"
    if err.retryable or err.code == "provider_error":
        return "server_error"
    return "client_error"


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
        detail = error_detail(exc.body) or str(exc.message)
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


def error_detail(body: object) -> str | None:
    """The message inside OpenAI's ``{"error": {"message": ...}}`` (or a bare
    ``{"error": "..."}``, ``{"message": ...}``, ``{"detail": ...}``), if there is one."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            for key in ("message", "detail"):
                if inner.get(key):
                    return str(inner[key])
        if isinstance(inner, str) and inner:
            return inner
    return None


def body_detail(raw: bytes) -> str:
    """What an error answer's body says, for the message."""
    try:
        found = error_detail(orjson.loads(raw))
    except orjson.JSONDecodeError:
        found = None
    if found:
        return found
    text = raw.decode("utf-8", "replace").strip()
    return text[:500] or "no details"
