"""``llmworker fake-llm``: an OpenAI-compatible provider for development, tests and
benchmarks. It is a real HTTP server speaking OpenAI's chat completions protocol
(streaming and not), with latency, jitter and injected errors.

It counts calls in flight per model and remembers the most seen at once, so a test can
prove that llmworker never sent more concurrent calls than a model's cap.

Control endpoints (not part of OpenAI's API):

- ``GET  /_fake/stats``     calls, in flight, max in flight, errors sent, per model
- ``POST /_fake/reset``     zero the counters and the timeline
- ``POST /_fake/config``    change settings live, e.g. ``{"latency_ms": 50,
                            "fail_next": [429, 500]}`` (the next calls fail in that order)
- ``GET  /_fake/timeline``  (start, end) of every call, seconds since the epoch, when
                            ``record`` is on (benchmarks measure pickup latency with it)
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

HANG_S = 3600.0


@dataclass
class FakeConfig:
    latency_ms: float = 500.0
    jitter_ms: float = 0.0
    tokens: int = 20
    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_timeout: float = 0.0
    retry_after_s: float = 1.0
    fail_next: list[int] = field(default_factory=list)
    record: bool = False
    seed: int | None = None


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status, headers, media_type="application/json")


class FakeLLM:
    def __init__(self, config: FakeConfig | None = None) -> None:
        self.config = config or FakeConfig()
        self.random = random.Random(self.config.seed)
        self.reset()

    def reset(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.inflight: dict[str, int] = defaultdict(int)
        self.max_inflight: dict[str, int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.timeline: list[tuple[float, float, str]] = []

    def _injected(self) -> int | None:
        """The status this call fails with, if any (0: hang until the client gives up)."""
        c = self.config
        if c.fail_next:
            return c.fail_next.pop(0)
        draw = self.random.random()
        for status, rate in ((429, c.rate_429), (500, c.rate_500), (0, c.rate_timeout)):
            if draw < rate:
                return status
            draw -= rate
        return None

    def _latency_s(self) -> float:
        c = self.config
        return (c.latency_ms + (self.random.uniform(0, c.jitter_ms) if c.jitter_ms else 0)) / 1000

    async def completions(self, request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
            model = str(body["model"])
            messages = body["messages"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _json(
                {
                    "error": {
                        "message": "body needs 'model' and 'messages'",
                        "type": "invalid_request_error",
                    }
                },
                400,
            )
        started = time.time()
        self.calls[model] += 1
        self.inflight[model] += 1
        self.max_inflight[model] = max(self.max_inflight[model], self.inflight[model])
        released = False
        status: int | None = None

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.inflight[model] -= 1
                if self.config.record:
                    self.timeline.append((started, time.time(), model))

        try:
            status = self._injected()
            if status is not None:
                self.errors[model] += 1
                if status == 0:
                    await asyncio.sleep(HANG_S)
                headers = (
                    {"Retry-After": f"{self.config.retry_after_s:g}"} if status == 429 else None
                )
                kind = "rate_limit_exceeded" if status == 429 else "server_error"
                return _json(
                    {"error": {"message": f"injected {status}", "type": kind}}, status, headers
                )
            words = self._reply(messages, body.get("max_tokens"))
            latency = self._latency_s()
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                stream = self._stream(model, words, latency, include_usage, release)
                return StreamingResponse(stream, media_type="text/event-stream")
            await asyncio.sleep(latency)
            return _json(self._completion(model, words, messages))
        finally:
            if not body.get("stream") or status is not None:
                release()

    def _reply(self, messages: list[dict[str, Any]], max_tokens: int | None) -> list[str]:
        n = self.config.tokens if max_tokens is None else min(self.config.tokens, int(max_tokens))
        return [f"tok{i}" for i in range(n)]

    def _usage(self, messages: list[dict[str, Any]], words: list[str]) -> dict[str, int]:
        prompt = sum(len(str(m.get("content", "")).split()) for m in messages)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": len(words),
            "total_tokens": prompt + len(words),
        }

    def _completion(
        self, model: str, words: list[str], messages: list[dict[str, Any]]
    ) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": " ".join(words)},
                    "finish_reason": "stop",
                }
            ],
            "usage": self._usage(messages, words),
        }

    async def _stream(
        self, model: str, words: list[str], latency: float, include_usage: bool, release: Any
    ) -> AsyncIterator[bytes]:
        cid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            choices = (
                [{"index": 0, "delta": delta, "finish_reason": finish}] if delta is not None else []
            )
            body = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": choices,
                **extra,
            }
            return b"data: " + orjson.dumps(body) + b"\n\n"

        try:
            step = latency / max(1, len(words))
            yield chunk({"role": "assistant", "content": ""})
            if not words:
                await asyncio.sleep(latency)
            for i, word in enumerate(words):
                await asyncio.sleep(step)
                yield chunk({"content": word if i == 0 else " " + word})
            yield chunk({}, "stop")
            if include_usage:
                yield chunk(None, usage=self._usage([], words))  # type: ignore[arg-type]
            yield b"data: [DONE]\n\n"
        finally:
            release()

    async def models(self, request: Request) -> Response:
        return _json(
            {"object": "list", "data": [{"id": m, "object": "model"} for m in sorted(self.calls)]}
        )

    async def stats(self, request: Request) -> Response:
        return _json(
            {
                "calls": dict(self.calls),
                "inflight": dict(self.inflight),
                "max_inflight": dict(self.max_inflight),
                "errors": dict(self.errors),
                "config": asdict(self.config),
            }
        )

    async def reset_endpoint(self, request: Request) -> Response:
        self.reset()
        return _json({"ok": True})

    async def configure(self, request: Request) -> Response:
        changes = orjson.loads(await request.body() or b"{}")
        known = {f.name for f in fields(FakeConfig)}
        unknown = set(changes) - known
        if unknown:
            return _json({"error": {"message": f"unknown settings: {sorted(unknown)}"}}, 400)
        for name, value in changes.items():
            setattr(self.config, name, value)
        if "seed" in changes:
            self.random.seed(changes["seed"])
        return _json(asdict(self.config))

    async def timeline_endpoint(self, request: Request) -> Response:
        return _json(self.timeline)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.completions, methods=["POST"]),
                Route("/chat/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/_fake/stats", self.stats, methods=["GET"]),
                Route("/_fake/reset", self.reset_endpoint, methods=["POST"]),
                Route("/_fake/config", self.configure, methods=["POST"]),
                Route("/_fake/timeline", self.timeline_endpoint, methods=["GET"]),
            ]
        )


def run_fake_llm(config: FakeConfig, host: str = "127.0.0.1", port: int = 9000) -> None:
    import uvicorn

    print(f"fake LLM provider on http://{host}:{port}/v1 (OpenAI-compatible)", flush=True)
    uvicorn.run(FakeLLM(config).app(), host=host, port=port, log_level="warning", access_log=False)
