"""``llmworker fake-llm``: an OpenAI-compatible provider for development, tests and
benchmarks. It is a real HTTP server speaking OpenAI's chat completions protocol
(streaming and not), with latency, jitter and injected errors, and the ways real
providers push back (capacity, per-minute windows, load, quota, outages: shapes.py).

It counts calls in flight per model and remembers the most seen at once, so a test can
prove that llmworker never sent more concurrent calls than a model's cap.

It speaks enough of the protocol to exercise a client: ``tools`` get a streamed tool
call (its arguments in pieces), models whose name contains "reasoner" stream
``reasoning_content`` first (as DeepSeek's do), ``n`` streams that many choices,
``logprobs`` adds log probabilities; ``models`` (when set) lists the only model names it
knows (others get OpenAI's 404 "model_not_found"), and ``reject_params`` names request
parameters it refuses with a 400, as a provider refuses what it does not support.

Control endpoints (not part of OpenAI's API):

- ``GET  /_fake/stats``     calls, in flight, max in flight, errors sent, per model
- ``POST /_fake/reset``     zero the counters and the timeline
- ``POST /_fake/config``    change settings live, e.g. ``{"latency_ms": 50,
                            "fail_next": [429, 500]}`` (the next calls fail in that order)
- ``GET  /_fake/timeline``  (start, end, model, seconds to the first streamed content or
                            null) of every call, seconds since the epoch, when
                            ``record`` is on (benchmarks measure pickup latency with it)
- ``GET  /_fake/last``      the body of the last completion request
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from llmworker.fakellm.shapes import Shapes

HANG_S = 3600.0
COMPLETION_PATHS = ("/v1/chat/completions", "/chat/completions")


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
    models: list[str] = field(default_factory=list)
    reject_params: list[str] = field(default_factory=list)
    # How real providers push back (shapes.py); 0 or empty: not at all.
    capacity: int = 0
    rpm: int = 0
    tpm: int = 0
    window_s: float = 60.0
    error_style: str = "openai"  # how a 429 reads: openai, glm (code 1302), gemini
    load_knee: int = 0
    load_ttft_ms: float = 0.0
    keepalive_s: float = 0.0
    quota_tokens: int = 0
    # Each streamed piece of content is its send time ("@<epoch seconds> "), so a reader
    # downstream can time each piece's way to it (bench/streams.py).
    stamp: bool = False
    quota_status: int = 429
    down: list[str] = field(default_factory=list)
    down_status: int = 503
    outage_after_s: float = 0.0
    outage_for_s: float = 0.0
    # model -> its context window: a prompt and max_tokens past it get OpenAI's 400
    # context_length_exceeded.
    context: dict[str, int] = field(default_factory=dict)


async def _send_json(
    send: Send, status: int, content: Any, headers: dict[str, str] | None = None
) -> None:
    raw = [(b"content-type", b"application/json")]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": orjson.dumps(content)})


def json_response(
    content: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A JSON answer, for the development servers (fake-llm, qstash-dev)."""
    return Response(orjson.dumps(content), status, headers, media_type="application/json")


class FakeLLM:
    def __init__(self, config: FakeConfig | None = None) -> None:
        self._control_app: Starlette | None = None
        self.config = config or FakeConfig()
        self.random = random.Random(self.config.seed)
        self.reset()

    def reset(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.inflight: dict[str, int] = defaultdict(int)
        self.max_inflight: dict[str, int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.timeline: list[tuple[float, float, str, float | None]] = []
        self.last_body: dict[str, Any] = {}
        self.shapes = Shapes(self.config, time.time())

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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI app. Completions are served on raw ASGI, without a framework's
        per-request tasks: the fake must cost far less than what it measures."""
        if (
            scope["type"] == "http"
            and scope["path"] in COMPLETION_PATHS
            and scope["method"] == "POST"
        ):
            await self._completions(receive, send)
        else:
            await self._control(scope, receive, send)

    async def _completions(self, receive: Receive, send: Send) -> None:
        arrived = time.time()
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            body = orjson.loads(raw)
            model = str(body["model"])
            messages = body["messages"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            error = {
                "message": "body needs 'model' and 'messages'",
                "type": "invalid_request_error",
            }
            await _send_json(send, 400, {"error": error})
            return
        self.last_body = body
        first: float | None = None
        refusal = self._refusal(body, model)
        if refusal is not None:
            await _send_json(send, *refusal)
            return
        words = self._reply(messages, body.get("max_tokens"))
        now = time.time()
        pushed_back = self.shapes.refuse(
            model, self.inflight[model], _prompt_tokens(messages) + len(words), now
        )
        if pushed_back is not None:
            self.calls[model] += 1
            self.errors[model] += 1
            await _send_json(send, *pushed_back)
            return
        limits = self.shapes.headers(model, now)
        self.calls[model] += 1
        self.inflight[model] += 1
        self.max_inflight[model] = max(self.max_inflight[model], self.inflight[model])
        # Resolves when the client goes away: the call stops counting as in flight.
        disconnected = asyncio.ensure_future(receive())
        try:
            status = self._injected()
            held = self.shapes.extra_ttft_s(self.inflight[model])
            if status is not None:
                await self._fail(send, model, status, disconnected)
            elif body.get("stream"):
                first = await self._stream(send, body, words, disconnected, limits, held)
            else:
                await asyncio.wait([disconnected], timeout=self._latency_s() + held)
                await _send_json(send, 200, self._completion(model, words, messages), limits)
        finally:
            disconnected.cancel()
            self.inflight[model] -= 1
            if self.config.record:
                ttft = None if first is None else first - arrived
                self.timeline.append((arrived, time.time(), model, ttft))

    async def _fail(
        self, send: Send, model: str, status: int, disconnected: asyncio.Future[Any]
    ) -> None:
        self.errors[model] += 1
        if status == 0:  # hang until the client gives up
            await asyncio.wait([disconnected], timeout=HANG_S)
            return
        headers = {"Retry-After": f"{self.config.retry_after_s:g}"} if status == 429 else {}
        kind = "rate_limit_exceeded" if status == 429 else "server_error"
        await _send_json(
            send, status, {"error": {"message": f"injected {status}", "type": kind}}, headers
        )

    def _refusal(self, body: dict[str, Any], model: str) -> tuple[int, dict[str, Any]] | None:
        """A 404 for a model it does not know, a 400 for a parameter it refuses."""
        if self.config.models and model not in self.config.models:
            error = {
                "message": f"The model `{model}` does not exist or you do not have access to it.",
                "type": "invalid_request_error",
                "code": "model_not_found",
            }
            return 404, {"error": error}
        window = self.config.context.get(model)
        if window:
            asked = _prompt_tokens(body.get("messages") or []) + int(
                body.get("max_tokens") or self.config.tokens
            )
            if asked > window:
                error = {
                    "message": f"This model's maximum context length is {window} tokens. "
                    f"However, you requested {asked} tokens. Please reduce the length of the "
                    "messages or completion.",
                    "type": "invalid_request_error",
                    "code": "context_length_exceeded",
                }
                return 400, {"error": error}
        for name in self.config.reject_params:
            if name in body:
                error = {
                    "message": f"Unrecognized request argument supplied: {name}",
                    "type": "invalid_request_error",
                }
                return 400, {"error": error}
        return None

    def _reply(self, messages: list[dict[str, Any]], max_tokens: int | None) -> list[str]:
        n = self.config.tokens if max_tokens is None else min(self.config.tokens, int(max_tokens))
        return [f"tok{i}" for i in range(n)]

    def _usage(self, messages: list[dict[str, Any]], words: list[str]) -> dict[str, int]:
        prompt = _prompt_tokens(messages)
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
        self,
        send: Send,
        body: dict[str, Any],
        words: list[str],
        disconnected: asyncio.Future[Any],
        limits: dict[str, str] | None = None,
        held_s: float = 0.0,
    ) -> float | None:
        """Stream the answer; when its first content went out (epoch seconds), if it did."""
        model = str(body["model"])
        first: float | None = None
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        choices = max(1, int(body.get("n") or 1))
        cid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        created = int(time.time())

        def chunk(
            deltas: list[dict[str, Any]] | None, finish: str | None = None, **extra: Any
        ) -> bytes:
            out = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [
                    {"index": i, "delta": delta, "finish_reason": finish}
                    for i, delta in enumerate(deltas or [])
                ],
                **extra,
            }
            return b"data: " + orjson.dumps(out) + b"\n\n"

        def each(delta: dict[str, Any]) -> list[dict[str, Any]]:
            return [dict(delta) for _ in range(choices)]

        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        headers += [(k.encode(), v.encode()) for k, v in (limits or {}).items()]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if held_s and not await self._hold(send, held_s, disconnected):
            return None
        steps = _script(body, model, words)
        latency = self._latency_s()
        step = latency / max(1, len(steps))
        # Piece i is due at start + (i + 1) * step: absolute times, so the timer's lateness
        # does not add up and a call lasts its latency, not latency + pieces x lateness.
        loop = asyncio.get_running_loop()
        start = loop.time()
        pieces = [chunk(each({"role": "assistant", "content": ""}))]
        if not steps:
            await asyncio.wait([disconnected], timeout=latency)
        for i, delta in enumerate(steps):
            await send({"type": "http.response.body", "body": b"".join(pieces), "more_body": True})
            if i == 1:
                first = time.time()
            await asyncio.wait(
                [disconnected], timeout=max(0.0, start + (i + 1) * step - loop.time())
            )
            if disconnected.done():
                return first
            if self.config.stamp and delta.get("content"):
                delta = {**delta, "content": f"@{time.time():.6f} "}
            if body.get("logprobs") and delta.get("content"):
                pieces = [_with_logprobs(chunk(each(delta)), delta["content"])]
            else:
                pieces = [chunk(each(delta))]
        finish = "tool_calls" if body.get("tools") and body.get("tool_choice") != "none" else "stop"
        pieces.append(chunk(each({}), finish))
        if include_usage:
            pieces.append(chunk(None, usage=self._usage([], words)))
        pieces.append(b"data: [DONE]\n\n")
        await send({"type": "http.response.body", "body": b"".join(pieces), "more_body": False})
        return first if first is not None else time.time()

    async def _hold(self, send: Send, seconds: float, disconnected: asyncio.Future[Any]) -> bool:
        """Hold the first token back (a busy provider), with a keep-alive comment every
        ``keepalive_s``; False if the client left meanwhile."""
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        every = self.config.keepalive_s
        while not disconnected.done():
            left = until - loop.time()
            if left <= 0:
                return True
            await asyncio.wait([disconnected], timeout=min(left, every) if every else left)
            if every and not disconnected.done() and until - loop.time() > 0:
                await send(
                    {"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True}
                )
        return False

    async def models(self, request: Request) -> Response:
        return json_response(
            {"object": "list", "data": [{"id": m, "object": "model"} for m in sorted(self.calls)]}
        )

    async def stats(self, request: Request) -> Response:
        return json_response(
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
        return json_response({"ok": True})

    async def configure(self, request: Request) -> Response:
        changes = orjson.loads(await request.body() or b"{}")
        known = {f.name for f in fields(FakeConfig)}
        unknown = set(changes) - known
        if unknown:
            return json_response(
                {"error": {"message": f"unknown settings: {sorted(unknown)}"}}, 400
            )
        for name, value in changes.items():
            setattr(self.config, name, value)
        if {"outage_after_s", "outage_for_s"} & set(changes):
            self.shapes.started = time.time()  # a scripted outage counts from now
        if "seed" in changes:
            self.random.seed(changes["seed"])
        return json_response(asdict(self.config))

    async def timeline_endpoint(self, request: Request) -> Response:
        return json_response(self.timeline)

    async def last_endpoint(self, request: Request) -> Response:
        return json_response(self.last_body)

    def app(self) -> FakeLLM:
        return self

    @property
    def _control(self) -> Starlette:
        if self._control_app is None:
            self._control_app = self._build_control()
        return self._control_app

    def _build_control(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/_fake/stats", self.stats, methods=["GET"]),
                Route("/_fake/reset", self.reset_endpoint, methods=["POST"]),
                Route("/_fake/config", self.configure, methods=["POST"]),
                Route("/_fake/timeline", self.timeline_endpoint, methods=["GET"]),
                Route("/_fake/last", self.last_endpoint, methods=["GET"]),
            ]
        )


def _prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(len(str(m.get("content", "")).split()) for m in messages)


def _script(body: dict[str, Any], model: str, words: list[str]) -> list[dict[str, Any]]:
    """The deltas of one streamed answer: reasoning first for a reasoner, then a tool
    call (its arguments in two pieces) when tools are offered, else the words."""
    steps: list[dict[str, Any]] = []
    if "reasoner" in model:
        steps += [{"reasoning_content": t} for t in ("Let me", " think.")]
    tools = body.get("tools") or []
    if tools and body.get("tool_choice") != "none":
        name = str(((tools[0] or {}).get("function") or {}).get("name") or "tool")
        first = {"index": 0, "id": "call_fake_1", "type": "function",
                 "function": {"name": name, "arguments": ""}}  # fmt: skip
        steps.append({"tool_calls": [first]})
        for part in ('{"q": ', '"fake"}'):
            steps.append({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
        return steps
    steps += [{"content": word if i == 0 else " " + word} for i, word in enumerate(words)]
    return steps


def _with_logprobs(raw: bytes, token: str) -> bytes:
    """A content chunk with each choice's log probability of its token."""
    data = orjson.loads(raw[len(b"data: ") :])
    for choice in data["choices"]:
        choice["logprobs"] = {
            "content": [
                {
                    "token": token,
                    "logprob": -0.25,
                    "bytes": list(token.encode()),
                    "top_logprobs": [],
                }
            ]
        }
    return b"data: " + orjson.dumps(data) + b"\n\n"


def run_fake_llm(config: FakeConfig, host: str = "127.0.0.1", port: int = 9000) -> None:
    import uvicorn

    print(f"fake LLM provider on http://{host}:{port}/v1 (OpenAI-compatible)", flush=True)
    uvicorn.run(FakeLLM(config), host=host, port=port, log_level="warning", access_log=False)
