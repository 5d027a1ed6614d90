"""How real providers push back, for the fake one to play (each off unless configured):

- **capacity** (Zhipu GLM): at most ``capacity`` calls in flight per model; the next gets
  a 429 at once (GLM's error code 1302, in ``error_style="glm"``);
- **per-minute windows** (OpenAI, Gemini): ``rpm`` requests and ``tpm`` tokens per model
  in any ``window_s`` (60 s; shorter in tests); every answer carries OpenAI's ``x-ratelimit-*`` headers, and a call over a
  limit gets a 429 with ``Retry-After`` (seconds until the window has room);
- **load** (DeepSeek): past ``load_knee`` calls in flight, each more call adds
  ``load_ttft_ms`` before the first token, held back behind SSE keep-alive comments
  every ``keepalive_s``, as DeepSeek keeps a busy connection open;
- **quota**: after ``quota_tokens`` tokens the account is out: OpenAI's 429
  ``insufficient_quota``, or a 402;
- **outages**: models in ``down`` (``*``: all) answer ``down_status``; or, scripted,
  every model from ``outage_after_s`` after the start for ``outage_for_s``.

Tokens are counted as OpenAI's limiter counts them at request time: the prompt's words
and ``max_tokens`` (or the configured answer length).
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmworker.fakellm.server import FakeConfig

# (status, JSON body, headers)
Refusal = tuple[int, dict[str, Any], dict[str, str]]


def _reset(seconds: float) -> str:
    """A duration as OpenAI's ``x-ratelimit-reset-*`` headers write it: ``1s``, ``6m0s``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{math.ceil(seconds * 1000) / 1000:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def rate_limited(style: str, what: str) -> dict[str, Any]:
    """A 429's body as the provider of ``style`` writes it."""
    if style == "glm":
        # Zhipu: concurrency over the account's limit.
        return {
            "error": {"code": "1302", "message": f"High concurrency usage of this API ({what})."}
        }
    if style == "gemini":
        return {
            "error": {
                "code": 429,
                "message": f"Resource has been exhausted (e.g. check quota): {what}.",
                "status": "RESOURCE_EXHAUSTED",
            }
        }
    return {
        "error": {
            "message": f"Rate limit reached: {what}.",
            "type": "requests" if "request" in what else "tokens",
            "code": "rate_limit_exceeded",
        }
    }


class Shapes:
    """The per-model state behind the limits: windows, quota used, the start time."""

    def __init__(self, config: FakeConfig, now: float) -> None:
        self.config = config
        self.started = now
        self.requests: dict[str, deque[float]] = defaultdict(deque)
        self.tokens: dict[str, deque[tuple[float, int]]] = defaultdict(deque)
        self.quota_used = 0

    def _prune(self, model: str, now: float) -> None:
        horizon = now - self.config.window_s
        requests, tokens = self.requests[model], self.tokens[model]
        while requests and requests[0] <= horizon:
            requests.popleft()
        while tokens and tokens[0][0] <= horizon:
            tokens.popleft()

    def _window(self, model: str, now: float) -> tuple[int, int, float, float]:
        """Requests and tokens in the window, and seconds until each frees a unit."""
        requests, tokens = self.requests[model], self.tokens[model]
        used_tokens = sum(n for _, n in tokens)
        request_reset = requests[0] + self.config.window_s - now if requests else 0.0
        token_reset = tokens[0][0] + self.config.window_s - now if tokens else 0.0
        return len(requests), used_tokens, request_reset, token_reset

    def headers(self, model: str, now: float) -> dict[str, str]:
        """OpenAI's rate limit headers, where a window is configured."""
        c = self.config
        if not (c.rpm or c.tpm):
            return {}
        self._prune(model, now)
        used_requests, used_tokens, request_reset, token_reset = self._window(model, now)
        out: dict[str, str] = {}
        if c.rpm:
            out["x-ratelimit-limit-requests"] = str(c.rpm)
            out["x-ratelimit-remaining-requests"] = str(max(0, c.rpm - used_requests))
            out["x-ratelimit-reset-requests"] = _reset(request_reset)
        if c.tpm:
            out["x-ratelimit-limit-tokens"] = str(c.tpm)
            out["x-ratelimit-remaining-tokens"] = str(max(0, c.tpm - used_tokens))
            out["x-ratelimit-reset-tokens"] = _reset(token_reset)
        return out

    def down(self, model: str, now: float) -> bool:
        c = self.config
        if "*" in c.down or model in c.down:
            return True
        if c.outage_for_s > 0:
            begins = self.started + c.outage_after_s
            return begins <= now < begins + c.outage_for_s
        return False

    def refuse(self, model: str, inflight: int, tokens: int, now: float) -> Refusal | None:
        """Why this call is refused before it starts, if it is; otherwise it is counted in
        the windows and the quota."""
        c = self.config
        if self.down(model, now):
            error = {"message": "The service is temporarily unavailable.", "type": "server_error"}
            return c.down_status, {"error": error}, {}
        if c.quota_tokens and self.quota_used >= c.quota_tokens:
            error = {
                "message": "You exceeded your current quota, please check your plan and "
                "billing details.",
                "type": "insufficient_quota",
                "code": "insufficient_quota",
            }
            return c.quota_status, {"error": error}, {}
        if c.rpm or c.tpm:
            self._prune(model, now)
            used_requests, used_tokens, request_reset, token_reset = self._window(model, now)
            wait = 0.0
            what = ""
            if c.rpm and used_requests >= c.rpm:
                wait, what = request_reset, f"{c.rpm} requests per minute"
            elif c.tpm and used_tokens + tokens > c.tpm:
                # Room comes back as the oldest entries leave the window.
                wait, what = self._tokens_free_in(model, tokens, now), f"{c.tpm} tokens per minute"
                wait = max(wait, token_reset if used_tokens >= c.tpm else 0.0)
            if what:
                headers = self.headers(model, now)
                headers["retry-after"] = str(max(1, math.ceil(wait)))
                headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
                return 429, rate_limited(c.error_style, what), headers
        if c.capacity and inflight >= c.capacity:
            what = f"{c.capacity} concurrent requests"
            return 429, rate_limited(c.error_style, what), {}
        self.requests[model].append(now)
        self.tokens[model].append((now, tokens))
        self.quota_used += tokens
        return None

    def _tokens_free_in(self, model: str, tokens: int, now: float) -> float:
        """Seconds until the window has room for ``tokens`` more."""
        c = self.config
        used = sum(n for _, n in self.tokens[model])
        for at, n in self.tokens[model]:
            used -= n
            if used + tokens <= c.tpm:
                return at + c.window_s - now
        return c.window_s

    def extra_ttft_s(self, inflight: int) -> float:
        """The wait before the first token that load adds (``inflight``: this call too)."""
        c = self.config
        if not c.load_ttft_ms:
            return 0.0
        return max(0, inflight - c.load_knee) * c.load_ttft_ms / 1000
