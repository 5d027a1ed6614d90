"""What a newcomer and a hostile client meet at the edge: closed by default, strict
input, bounded connections, no tracebacks."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import urlsplit

import pytest
import structlog

from llmworker.errors import ConfigError
from llmworker.settings import load_settings
from llmworker.worker import Worker

from .conftest import CALLBACK_SECRET, LoopbackServer, serve_api, tasks_with

CHAT: dict[str, Any] = {
    "kind": "chat",
    "input": {"messages": [{"role": "user", "content": "hello"}]},
}
JSON_HEADERS = {"content-type": "application/json"}


async def waiting(worker: Worker) -> int:
    return sum(n for key, n in (await worker.queue.depths()).items() if "|" not in key)


# -- closed by default -----------------------------------------------------------------


def test_serving_others_with_only_the_simulated_model_is_refused_in_one_line():
    with pytest.raises(ConfigError) as refused:
        load_settings({"HOST": "0.0.0.0", "API_KEYS": "k" * 20}, env_file=None)
    (line,) = refused.value.problems
    assert "DEEPSEEK_API_KEY" in line and "ALLOW_FAKE_MODEL" in line


def test_the_default_host_is_loopback():
    assert load_settings({}, env_file=None).host == "127.0.0.1"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3"])
def test_listening_beyond_loopback_without_keys_is_refused_in_one_line(host: str):
    with pytest.raises(ConfigError) as refused:
        load_settings({"HOST": host, "ALLOW_FAKE_MODEL": "true"}, env_file=None)
    (line,) = refused.value.problems
    assert "API_KEYS" in line and f"HOST={host}" in line and "ALLOW_ANONYMOUS" in line


@pytest.mark.parametrize(
    "env",
    [
        {"HOST": "0.0.0.0", "API_KEYS": "k" * 20, "DEEPSEEK_API_KEY": "sk-x"},
        {"HOST": "0.0.0.0", "ADMIN_KEYS": "k" * 20, "ALLOW_FAKE_MODEL": "true"},
        {"HOST": "localhost"},
        {"HOST": "::1"},
        {"HOST": "127.0.0.2"},
    ],
)
def test_keys_or_loopback_may_serve(env: dict[str, str]):
    load_settings(env, env_file=None)


async def test_allow_anonymous_serves_beyond_loopback_and_warns_at_every_start(
    make_settings, start_worker
):
    settings = make_settings(HOST="0.0.0.0", ALLOW_ANONYMOUS="true", ALLOW_FAKE_MODEL="true")
    for _ in range(2):
        with structlog.testing.capture_logs() as logs:
            worker = await start_worker(settings, dispatch=False)
            await worker.stop()
        assert [e for e in logs if e["event"] == "anonymous_access"]


# -- strict input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x", "json"],
)
async def test_a_submission_not_declared_as_json_is_415_and_queues_nothing(
    make_settings, content_type: str | None
):
    async with serve_api(make_settings(), dispatch=False) as (client, worker):
        headers = {"content-type": content_type} if content_type else {}
        body = b'{"kind": "chat", "input": {"messages": [{"role": "user", "content": "x"}]}}'
        r = await client.post("/v1/tasks", content=body, headers=headers)
        assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"
        assert await waiting(worker) == 0
        ok = await client.post(
            "/v1/tasks", content=body, headers={"content-type": "Application/JSON; charset=utf-8"}
        )
        assert ok.status_code == 202


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"timeout_s": "5"}, "timeout_s"),
        ({"timeout_s": True}, "timeout_s"),
        ({"user": 5}, "user"),
        ({"id": 7}, "id"),
        ({"tier": False}, "tier"),
        ({"metadata": "{}"}, "metadata"),
        ({"input": {**CHAT["input"], "temperature": "0.5"}}, "input.temperature"),
        ({"input": {**CHAT["input"], "temperature": True}}, "input.temperature"),
        ({"input": {**CHAT["input"], "max_tokens": "10"}}, "input.max_tokens"),
        ({"input": {**CHAT["input"], "max_tokens": 10.0}}, "input.max_tokens"),
        ({"input": {**CHAT["input"], "n": True}}, "input.n"),
        ({"input": {**CHAT["input"], "logprobs": 1}}, "input.logprobs"),
        ({"input": {**CHAT["input"], "stream": "yes"}}, "input.stream"),
    ],
)
async def test_numbers_and_booleans_are_never_coerced(make_settings, change, field):
    async with serve_api(make_settings(), dispatch=False) as (client, worker):
        r = await client.post("/v1/tasks", json={**CHAT, **change})
        assert r.status_code == 422, r.text
        assert r.json()["field"] == field
        if field.startswith("input."):
            assert "chat parameter" in r.json()["message"]
        assert await waiting(worker) == 0


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://0x7f000001/cb", "canonical IPv4"),
        ("http://2130706433/cb", "canonical IPv4"),
        ("http://127.1/cb", "canonical IPv4"),
        ("http://0/cb", "canonical IPv4"),
        ("http://0177.0.0.1/cb", "canonical IPv4"),
        ("http://10.0.0.010/cb", "canonical IPv4"),
        ("http://app.example.com:0/cb", "port"),
        ("http://app.example.com:99999/cb", "not a valid URL"),
        ("http://exa mple.com/cb", "spaces"),
        ("http://app.example.com/c b", "spaces"),
        ("http://app\x00.example.com/cb", "control"),
        ("ftp://app.example.com/cb", "http"),
        ("http:///cb", "http"),
        ("http://127.0.0.1/cb", "internal"),
        ("http://①②⑦。0。0。1/cb", "internal"),
        ("http://[::127.0.0.1]/cb", "internal"),
        ("http://[64:ff9b::7f00:1]/cb", "internal"),
        ("http://a..example.com/cb", "not a valid host name"),
        ("http://-a-.example.com/cb", "not a valid host name"),
    ],
)
async def test_callback_urls_are_read_as_the_http_client_reads_them(make_settings, url, words):
    settings = make_settings(CALLBACK_SECRET=CALLBACK_SECRET)
    async with serve_api(settings, dispatch=False) as (client, worker):
        r = await client.post("/v1/tasks", json={**CHAT, "callback_url": url})
        assert r.status_code == 422, r.text
        assert r.json()["field"] == "callback_url" and words in r.json()["message"]
        assert await waiting(worker) == 0


@pytest.mark.parametrize(
    "cursor",
    [
        "١٢٣",  # Arabic-Indic digits: Python's \d takes them, Redis does not
        "123-٤",
        "1" * 21,
        str(2**64),
        f"1-{2**64}",
        "-1",
        "1-2-3",
        " 1",
        "1 ",
        "0x10",
        "$",
        "+",
    ],
)
async def test_an_event_cursor_redis_would_refuse_is_400_before_the_stream(
    make_settings, cursor: str
):
    async with serve_api(make_settings(), dispatch=False) as (client, _):
        task = (await client.post("/v1/tasks", json=CHAT)).json()
        path = f"/v1/tasks/{task['id']}/events"
        by_query = await client.get(path, params={"after": cursor})
        assert by_query.status_code == 400 and "Last-Event-ID" in by_query.json()["message"]
        if cursor.isascii() and cursor == cursor.strip():  # as a header can carry it
            by_header = await client.get(path, headers={"last-event-id": cursor})
            assert by_header.status_code == 400


async def test_the_largest_event_cursor_is_taken(make_settings):
    async with serve_api(make_settings(), dispatch=False) as (client, _):
        task = (await client.post("/v1/tasks", json=CHAT)).json()
        await client.delete(f"/v1/tasks/{task['id']}")
        top = f"{2**64 - 1}-{2**64 - 1}"
        r = await client.get(f"/v1/tasks/{task['id']}/events", params={"after": top})
        assert r.status_code == 200 and r.text.startswith("event: record")


async def test_ready_tells_anonymous_callers_nothing_about_hosts(make_settings):
    async with serve_api(make_settings(API_KEYS="k" * 20), dispatch=False) as (client, _):
        r = await client.get("/ready")
        assert r.status_code == 200 and r.json() == {"status": "ready"}


# -- bounded connections ---------------------------------------------------------------


async def _raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    return await asyncio.open_connection(parts.hostname, parts.port)


async def test_a_client_that_disconnects_mid_upload_is_a_debug_line_not_a_traceback(
    make_settings, caplog
):
    caplog.set_level(logging.DEBUG)
    async with serve_api(make_settings(), dispatch=False) as (client, worker):
        _reader, writer = await _raw(str(client.base_url))
        writer.write(
            b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000\r\n\r\n" + b'{"kind": "chat", "input": '
        )
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        await asyncio.sleep(0.3)
        assert (await client.get("/health")).status_code == 200
        assert await waiting(worker) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_too_many_headers_or_header_bytes_get_431(make_settings):
    settings = make_settings(HTTP_MAX_HEADERS=20, HTTP_MAX_HEADER_BYTES=4096)
    async with serve_api(settings, dispatch=False) as (client, _):
        url = str(client.base_url)
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(40))
        big = b"X-Big: " + b"v" * 8000 + b"\r\n"
        for extra in (many, big):
            reader, writer = await _raw(url)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5)
            assert answer.startswith(b"HTTP/1.1 431"), answer[:80]
            writer.close()
        assert (await client.get("/health")).status_code == 200


async def test_a_connection_that_sends_nothing_is_closed(make_settings):
    async with serve_api(make_settings(HTTP_IDLE_TIMEOUT_S=0.3), dispatch=False) as (client, _):
        url = str(client.base_url)
        # Silent from the start.
        reader, writer = await _raw(url)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        # Headers trickled, then silence.
        reader, writer = await _raw(url)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        # A body that stops halfway.
        reader, writer = await _raw(url)
        writer.write(
            b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        # An open event stream is not idle: the client owes nothing while it reads.
        task = (await client.post("/v1/tasks", json=CHAT)).json()
        async with client.stream("GET", f"/v1/tasks/{task['id']}/events") as stream:
            lines = stream.aiter_lines()
            assert (await lines.__anext__()).startswith("id:")
            await asyncio.sleep(0.8)
            await client.delete(f"/v1/tasks/{task['id']}")
            rest = [line async for line in lines]
        assert "event: record" in rest


@pytest.mark.parametrize("field", ["metadata", "input"])
async def test_json_nested_too_deep_to_store_is_422_not_500(make_settings, field: str):
    deep: dict[str, Any] = {}
    for _ in range(300):
        deep = {"a": deep}
    body = {**CHAT, "metadata": deep} if field == "metadata" else {"kind": "echo", "input": deep}

    async def echo(ctx: Any, input: Any) -> Any:
        return input

    async with serve_api(make_settings(), dispatch=False, tasks=tasks_with(("echo", echo))) as (
        client,
        worker,
    ):
        r = await client.post("/v1/tasks", json=body)
        assert r.status_code == 422 and r.json()["field"] == field, r.text
        assert await waiting(worker) == 0


async def test_a_large_body_within_max_body_bytes_is_taken_in_one_write(make_settings):
    """Headers and a large body arriving together are not mistaken for large headers."""
    async with serve_api(make_settings(), dispatch=False) as (client, worker):
        body = json.dumps({**CHAT, "metadata": {"blob": "x" * 600_000}}).encode()
        reader, writer = await _raw(str(client.base_url))
        writer.write(
            b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 202"), answer[:120]
        assert await waiting(worker) == 1


async def test_headers_trickled_byte_by_byte_are_cut_at_the_deadline(make_settings):
    """Each byte resets no timer: the head must be complete within HTTP_IDLE_TIMEOUT_S."""
    async with serve_api(make_settings(HTTP_IDLE_TIMEOUT_S=0.5), dispatch=False) as (client, _):
        reader, writer = await _raw(str(client.base_url))
        started = asyncio.get_running_loop().time()
        closed = False
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                closed = True
                break
            if reader.at_eof():
                closed = True
                break
            await asyncio.sleep(0.05)
            if asyncio.get_running_loop().time() - started > 4:
                break
        closed = closed or await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
        assert closed and asyncio.get_running_loop().time() - started < 4


async def test_readers_that_leave_take_their_redis_reads_with_them(make_settings):
    """A reader that disconnects from an event stream frees its blocking XREAD (and its
    Redis connection) at once, not when the read times out."""
    async with serve_api(make_settings(FAKE_LATENCY_MS=20000)) as (client, worker):
        task = (await client.post("/v1/tasks", json=CHAT)).json()
        pool = worker.redis.connection_pool
        for _ in range(20):
            async with client.stream("GET", f"/v1/tasks/{task['id']}/events") as stream:
                async for line in stream.aiter_lines():
                    if "running" in line:
                        break
        await asyncio.sleep(0.3)
        # Blocked reads hold their connections out of the pool until they end.
        assert len(pool._in_use_connections) <= 3, len(pool._in_use_connections)
        await client.delete(f"/v1/tasks/{task['id']}")


async def test_stray_bytes_after_an_answer_do_not_keep_a_connection_open(make_settings):
    async with serve_api(make_settings(HTTP_IDLE_TIMEOUT_S=0.5), dispatch=False) as (client, _):
        reader, writer = await _raw(str(client.base_url))
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await reader.readuntil(b'{"status":"ok"}')
        loop = asyncio.get_running_loop()
        started = loop.time()
        closed = False
        while loop.time() - started < 12:  # keep-alive is 5 s; empty lines must not extend it
            writer.write(b"\r\n")
            await writer.drain()
            try:
                closed = await asyncio.wait_for(reader.read(1), 1) == b""
            except TimeoutError:
                closed = False
            except ConnectionError:
                closed = True
            if closed:
                break
        writer.close()
        assert closed and loop.time() - started < 8


async def test_pipelined_requests_after_a_large_body_are_all_answered(make_settings):
    async with serve_api(make_settings(), dispatch=False) as (client, worker):
        body = json.dumps({**CHAT, "metadata": {"blob": "x" * 40_000}}).encode()
        post = (
            b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        reader, writer = await _raw(str(client.base_url))
        writer.write(post + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 202") and b'{"status":"ok"}' in answer
        assert await waiting(worker) == 1


async def test_a_slow_app_is_not_taken_for_a_slow_client():
    """uvicorn stops reading while the app has not taken the body: the client owes
    nothing meanwhile, and the connection stays."""
    from llmworker.protocol import BoundedHttpProtocol

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await asyncio.sleep(3.0)
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(size).encode()})

    # Idle after 1 s: the app's 3 s are three timeouts, while a process the loaded
    # machine does not schedule for a moment (data unread meanwhile) is not one.
    BoundedHttpProtocol.idle_timeout_s = 1.0
    try:
        async with LoopbackServer(slow, http=BoundedHttpProtocol) as url:
            reader, writer = await _raw(url)
            body = b"x" * 300_000
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
            writer.write(body)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(200), 10)
            writer.close()
    finally:
        BoundedHttpProtocol.idle_timeout_s = 20.0
    assert answer.startswith(b"HTTP/1.1 200") and b"\r\n300000\r\n" in answer
