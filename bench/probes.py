"""Malformed requests for the ``malformed`` chaos scenario, as raw bytes, from a seeded
generator: fixed cases by category, and random mutations of them.

Look-alike characters are written as escapes (``fullwidth("chat")``, ``ARABIC_DIGITS``)
so that what each case sends can be read from the source.
"""

from __future__ import annotations

import json
import random
import urllib.parse
from dataclasses import dataclass
from typing import Any

from bench.harness import CHAT_INPUT

BASE: dict[str, Any] = {"kind": "chat", "tier": "free", "user": "mal", "input": CHAT_INPUT}
FIELDS: tuple[str, ...] = ("id", "kind", "input", "user", "tier", "model", "idempotency_key")
FIELDS += ("callback_url", "timeout_s", "metadata")
MAX_BODY_BYTES = 1 << 20  # the worker's default
QUICK_SIZE, FULL_SIZE = 200, 1000

ARABIC_DIGITS = "".join(chr(0x660 + i) for i in range(10))  # Arabic-Indic
FULLWIDTH_DIGITS = "".join(chr(0xFF10 + i) for i in range(10))
BOLD_DIGITS = "".join(chr(0x1D7CE + i) for i in range(10))  # mathematical bold
SUPERSCRIPT_123 = "\u00b9\u00b2\u00b3"


def fullwidth(text: str) -> str:
    """ASCII letters and digits as their fullwidth forms, which NFKC folds back."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


@dataclass(frozen=True)
class Probe:
    """One request as bytes on the wire. ``cut``: the connection is closed after sending,
    without waiting for an answer. ``stream``: an event stream, whose 200 must end with
    its ``record`` event."""

    category: str
    label: str
    data: bytes
    cut: bool = False
    stream: bool = False


Headers = tuple[tuple[str | bytes, str | bytes], ...]


def _b(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")


def request(
    method: str | bytes,
    target: str | bytes,
    body: bytes = b"",
    headers: Headers = (),
    *,
    content_type: bytes | None = b"application/json",
    length: bool = True,
) -> bytes:
    """A request as raw bytes (``Connection: close``: the answer ends with the connection)."""
    lines = [_b(method) + b" " + _b(target) + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines.append(b"Connection: close")
    if content_type is not None:
        lines.append(b"Content-Type: " + content_type)
    if length and (body or _b(method) in (b"POST", b"PUT", b"PATCH")):
        lines.append(b"Content-Length: %d" % len(body))
    lines += [_b(k) + b": " + _b(v) for k, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def dumps(value: Any, ascii_only: bool = False) -> bytes:
    """JSON as a careless client writes it: big integers, lone surrogates, NaN."""
    return _b(json.dumps(value, ensure_ascii=ascii_only))


def post_task(category: str, label: str, body: bytes, **kwargs: Any) -> Probe:
    return Probe(category, label, request("POST", "/v1/tasks", body, **kwargs))


def with_field(name: str, value: Any) -> dict[str, Any]:
    return {**BASE, name: value}


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def _chunked(body: bytes, size: int = 65536) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


# -- the fixed cases, by category ----------------------------------------------------

VALID = dumps(BASE)
WRONG_VALUES: list[Any] = [0, 1.5, -1, 2**64, True, False, None, "", "12", "abc", 1e308]
WRONG_VALUES += [[], ["chat"], {}, {"$ne": None}, [[{"a": [None, {}]}]]]


def bad_json() -> list[Probe]:
    bodies: list[tuple[str, bytes]] = [
        *[("empty", b""), ("space", b" "), ("open brace", b"{"), ("close brace", b"}")],
        *[("empty object", b"{}"), ("array", b"[]"), ("null", b"null"), ("true", b"true")],
        *[("number", b"0"), ("string", b'"chat"'), ("single quotes", b"{'kind': 'chat'}")],
        ("trailing comma", b'{"kind": "chat",}'),
        ("missing comma", b'{"kind": "chat" "input": {}}'),
        ("NaN", b'{"kind": NaN}'),
        ("Infinity", b'{"kind": "chat", "timeout_s": Infinity}'),
        ("BOM", b"\xef\xbb\xbf" + VALID),
        ("UTF-16", VALID.decode().encode("utf-16")),
        ("trailing garbage", VALID + b"garbage"),
        ("two objects", VALID + VALID),
        ("deep arrays", b"[" * 100_000 + b"]" * 100_000),
        ("deep objects", b'{"a":' * 2000 + b"1" + b"}" * 2000),
        ("lone surrogate", b'{"kind": "\\ud800"}'),
        ("invalid UTF-8", b'{"kind": "\xc3\x28"}'),
        ("raw NUL in string", b'{"kind": "ch\x00at"}'),
        ("raw newline in string", b'{"kind": "ch\nat"}'),
        ("1e999999", b'{"kind": "chat", "input": {"messages": []}, "timeout_s": 1e999999}'),
        ("5000-digit number", b'{"kind": "chat", "timeout_s": ' + b"9" * 5000 + b"}"),
        ("duplicate keys", b'{"kind": "chat", "kind": "summarize"}'),
        ("NULs", b"\x00" * 64),
        ("binary", bytes(range(256))),
        ("missing brace", VALID[:-1]),
        ("missing value", b'{"kind": "chat", "input": }'),
        ("NUL after object", VALID + b"\x00"),
    ]
    return [post_task("bad JSON", label, body) for label, body in bodies]


def wrong_types() -> list[Probe]:
    return [
        post_task("wrong types", f"{name}={json.dumps(value)[:20]}", dumps(with_field(name, value)))
        for name in FIELDS
        for value in WRONG_VALUES
    ]


def bad_inputs() -> list[Probe]:
    hi = {"role": "user", "content": "hi"}
    inputs: list[Any] = [
        *["hi", 5, [], None, {"messages": "hi"}, {"messages": []}, {"messages": [{}]}],
        {"messages": [{"role": 5, "content": []}]},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user", "content": None}]},
        {"messages": [{"role": "user", "content": [{"type": 5}]}]},
        *[{"messages": [hi], "temperature": "hot"}, {"messages": [hi], "max_tokens": -5}],
        *[{"messages": [hi], "max_tokens": 2**70}, {"messages": [hi], "response_format": "j"}],
        *[{"messages": [hi], "stream": "yes"}, {"messages": [hi], "model": ["x"]}],
        *[{"messages": [hi], "n": 1000}, {"messages": [hi], "tools": [{"type": 5}]}],
        *[{"messages": [hi] * 1000}, {"messages": [hi], "foo": 1}],
        {"messages": [{"role": "user", "content": "x" * 900_000}]},
    ]
    return [
        post_task("chat inputs", json.dumps(value)[:30], dumps(with_field("input", value)))
        for value in inputs
    ]


def unknown_fields() -> list[Probe]:
    extras: list[dict[str, Any]] = [{"extra": 1}, {"Kind": "chat"}, {"status": "succeeded"}]
    extras += [{"attempts": 99}, {"result": {"x": 1}}, {"token": "t"}, {"holder": "h"}]
    extras += [{"runs": 5}, {"": 1}, {"__proto__": {"admin": True}}, {"kind ": "chat"}]
    extras += [{"\u0000": 1}, {"\U0001f642": 1}, {"a" * 10_000: 1}]
    return [
        post_task("unknown fields", json.dumps(extra)[:30], dumps({**BASE, **extra}))
        for extra in extras
    ]


def huge_and_unicode() -> list[Probe]:
    smile = "\U0001f642"
    values: list[tuple[str, Any]] = [
        *[("user", "\u00e9" * 200), ("user", "\u00e9" * 201), ("user", smile * 200)],
        *[("user", smile * 201), ("user", "\u202egnp.exe"), ("user", "a\u200db")],
        *[("user", "e\u0301"), ("user", "\ufeffuser"), ("user", "\U0010ffff")],
        *[("user", "\ud800"), ("user", "x" * 100_000)],
        *[("kind", "\u00e7hat"), ("kind", fullwidth("chat")), ("kind", "chat\u200b")],
        *[("kind", "CHAT"), ("kind", "chat" + "x" * 100)],
        *[("tier", fullwidth("paid")), ("tier", "Paid"), ("tier", "paid\u200b")],
        *[("tier", "free "), ("model", fullwidth("fake")), ("model", "FAKE")],
        *[("model", "x" * 65), ("id", "\u00e9"), ("id", "a" * 128), ("id", "a" * 129)],
        *[("id", ARABIC_DIGITS[1:4]), ("id", "ab/cd"), ("id", "../x")],
        *[("idempotency_key", "\u952e" * 200), ("idempotency_key", "\u952e" * 201)],
        *[("idempotency_key", "*"), ("idempotency_key", "[a-z]?")],
        *[("idempotency_key", "{x}"), ("idempotency_key", "\ud83d")],
        ("input", {"messages": [{"role": "user", "content": smile * 200_000}]}),
        ("metadata", {"k": "x" * 900_000}),
        *[("metadata", {"a" * 1000: 1}), ("metadata", {"n": list(range(50_000))})],
        *[("timeout_s", 1e-300), ("timeout_s", 86400), ("timeout_s", 86400.0001)],
        *[("timeout_s", 5e-324), ("timeout_s", -0.0)],
    ]
    return [
        post_task("huge and Unicode", f"{name}={str(value)[:16]!r}", dumps(with_field(name, value)))
        for name, value in values
    ]


def deep_nesting() -> list[Probe]:
    """JSON nested deeper than a serialiser may go (orjson stops at 254 levels)."""

    def nested_list(depth: int) -> Any:
        value: Any = "x"
        for _ in range(depth):
            value = [value]
        return value

    cases: list[tuple[str, dict[str, Any]]] = [
        (f"metadata nested {d} deep", with_field("metadata", _nested(d))) for d in (253, 254, 500)
    ]
    content = {"role": "user", "content": nested_list(300)}
    cases.append(("message content nested 300 deep", with_field("input", {"messages": [content]})))
    deep_format = {"messages": [{"role": "user", "content": "hi"}], "response_format": _nested(300)}
    cases.append(("response_format nested 300 deep", with_field("input", deep_format)))
    return [post_task("deep nesting", label, dumps(body)) for label, body in cases]


def control_characters() -> list[Probe]:
    texts = ["a\u0000b", "a\tb", "a\r\nb", "\u001b[31mred", "a\u007fb", "a\u0085b"]
    names = ("user", "kind", "tier", "model", "idempotency_key", "id", "callback_url")
    probes = [
        post_task("control characters", f"{name}={text!r}", dumps(with_field(name, text)))
        for name in names
        for text in texts
    ]
    nul_content = {"messages": [{"role": "user", "content": "\0"}]}
    for label, body in (
        ("metadata NUL", with_field("metadata", {"x": "\0"})),
        ("content NUL", with_field("input", nul_content)),
    ):
        probes.append(post_task("control characters", label, dumps(body)))
    return probes


CONTENT_TYPES: list[bytes | None] = [
    *[None, b"text/plain", b"application/x-www-form-urlencoded", b"application/xml"],
    *[b"multipart/form-data; boundary=x", b"application/json; charset=utf-16"],
    *[b"APPLICATION/JSON", b"application/jsonx", b"*/*", b"", b"application/json; charset=\xff"],
    *[b"text/html; charset=utf-8", b"application/problem+json", b"application/json, text/plain"],
]


def _shown(content_type: bytes | None) -> str:
    if content_type is None:
        return "none"
    return repr(content_type.decode("latin-1")) if content_type else "empty"


def content_types() -> list[Probe]:
    probes = [post_task("Content-Type", _shown(ct), VALID, content_type=ct) for ct in CONTENT_TYPES]
    two = (("Content-Type", "text/plain"),)
    probes.append(post_task("Content-Type", "two headers", VALID, headers=two))
    return probes


EVENT_IDS = [
    *(ARABIC_DIGITS[1:4], FULLWIDTH_DIGITS[1:4], BOLD_DIGITS[1:4], SUPERSCRIPT_123),
    *(f"{ARABIC_DIGITS[0]}-{ARABIC_DIGITS[0]}", "1" * 25, "-1", "1-2-3", " 1", "1 2", ""),
    *("0-", "-0", "1-", "abc", "0x10", "1e5", "1\t2", "$", "+", ">", "*", "\u0000"),
    *("99999999999999999999", "18446744073709551616", "1-99999999999999999999"),
    *("18446744073709551615-18446744073709551615", "18446744073709551615-18446744073709551616"),
    *("0-0", "1764352630545-0", "00000000000000000001", "1" * 20, "0" * 21),
]


def events_probe(task_id: str, event_id: str, form: str, category: str = "event ids") -> Probe:
    path = f"/v1/tasks/{task_id}/events"
    if form == "query":
        target = path + "?after=" + urllib.parse.quote(event_id, safe="")
        data = request("GET", target, content_type=None)
    else:
        data = request("GET", path, headers=(("Last-Event-ID", event_id),), content_type=None)
    return Probe(category, f"{form} {event_id[:44]!r}", data, stream=True)


def event_ids(task_id: str) -> list[Probe]:
    return [events_probe(task_id, e, form) for e in EVENT_IDS for form in ("query", "header")]


LOOPBACK_HOSTS = [
    *("0x7f000001", "2130706433", "127.1", "0", "0177.0.0.1", "0x7f.0.0.1", "017700000001"),
    *("127.0.0.1.", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::1]", "[0:0:0:0:0:0:0:1]"),
    *("localhost", "LOCALHOST", "localhost.", "127.0.0.1", "%31%32%37.0.0.1", "0.0.0.0", "[::]"),
    # Circled digits and ideographic full stops, which IDNA folds to 127.0.0.1.
    "\u2460\u2461\u2466.0.0.1",
    "127\u30020\u30020\u30021",
]


def callback_urls(port: int) -> list[Probe]:
    urls = [f"http://{host}:{port}/ssrf" for host in LOOPBACK_HOSTS]
    urls += [
        *("http://0x7f000001/", "http://2130706433/", "http://127.1/", "http://0/"),
        *("http://0177.0.0.1/", "http://exa mple.com/", "http://example.com/ x"),
        *("http://example.com\u0000.evil/", "http://example.com:0/", "http://example.com:65536/"),
        *("http://example.com:-1/", "http://example.com:99999999999999999999/"),
        *("http://user:pass@example.com/", f"http://example.com@127.0.0.1:{port}/ssrf"),
        *(f"http://example.com\\@127.0.0.1:{port}/ssrf", f"http://example.com#@127.0.0.1:{port}/"),
        *("ftp://example.com/", "javascript:alert(1)", "http://", "http:///path"),
        *("https://" + "a" * 2100 + ".com/", "http://" + "a." * 100 + "com/"),
        *("http://[::1%25lo]/", "http://[fe80::1%eth0]/", "http://169.254.169.254/latest/"),
        *("http://metadata.google.internal/", "http://\u4f8b\u5b50.\u6d4b\u8bd5/"),
        *("http://-a-.com/", "http://a..b/", "HTTP://EXAMPLE.COM/", "http://example.com:/"),
    ]
    return [
        post_task("callback URLs", url[:48], dumps(with_field("callback_url", url))) for url in urls
    ]


METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE", "CONNECT"]
METHODS += ["PROPFIND", "FOO", "get", "G\u0000T", "A" * 1000]


def methods_and_paths(task_id: str) -> list[Probe]:
    probes = [
        Probe("methods and paths", f"{m[:10]!r} {path}", request(m, path, content_type=None))
        for m in METHODS
        for path in ("/v1/tasks", "/v1/tasks/no-such-task", "/health")
    ]
    paths = [
        *(f"/v1/tasks/{task_id}", f"/v1/tasks/{task_id}/events/extra", "/v1/stats", "/ready"),
        *("/v1/qstash", "/", "/v2/tasks", "/v1/tasks/", "/v1//tasks", "/v1/tasks/../stats"),
        *("/%2e%2e/%2e%2e/etc/passwd", "/v1/tasks/%00", "/v1/tasks/%ZZ", "*"),
        *("/v1/tasks/" + "a" * 10_000, "/v1/tasks?idempotency_key=", "/health?" + "x=1&" * 5000),
        *("/v1/tasks?idempotency_key=%00", "/v1/tasks?idempotency_key=" + "k" * 10_000),
        *("/v1/tasks?idempotency_key=%E9%94%AE&idempotency_key=x", "http://127.0.0.1/v1/stats"),
        *("/v1/tasks/" + ARABIC_DIGITS[1:4], "/v1/tasks/%D9%A1%D9%A2%D9%A3"),
        "/v1/tasks/%F0%9F%99%82/events",
    ]
    probes += [
        Probe("methods and paths", f"{m} {path[:40]}", request(m, path, content_type=None))
        for path in paths
        for m in ("GET", "PUT")
    ]
    return probes


def oversized() -> list[Probe]:
    big = dumps(with_field("metadata", {"pad": "x" * MAX_BODY_BYTES}))
    te = (("Transfer-Encoding", "chunked"),)

    def post(body: bytes, *headers: tuple[str, str], length: bool = True) -> bytes:
        return request("POST", "/v1/tasks", body, headers, length=length)

    cases: list[tuple[str, bytes]] = [
        ("1 MiB + body", post(big)),
        ("4 MiB body", post(big * 4)),
        ("declared 10^12", post(b"{}", ("Content-Length", "1000000000000"), length=False)),
        ("chunked 2 MiB", post(_chunked(big * 2), *te, length=False)),
        ("chunked valid", post(_chunked(VALID, 7), *te, length=False)),
        ("Content-Length -1", post(VALID, ("Content-Length", "-1"), length=False)),
        ("Content-Length abc", post(VALID, ("Content-Length", "abc"), length=False)),
        ("Content-Length 1e3", post(VALID, ("Content-Length", "1e3"), length=False)),
        ("two Content-Lengths", post(VALID, ("Content-Length", "3"))),
        ("Content-Length and chunked", post(_chunked(VALID), *te)),
        ("Transfer-Encoding gzip", post(VALID, ("Transfer-Encoding", "gzip"), length=False)),
        ("bad chunk size", post(b"zz\r\n{}\r\n0\r\n\r\n", *te, length=False)),
        (
            "chunk extension",
            post(b"2;" + b"e" * 10_000 + b"\r\n{}\r\n0\r\n\r\n", *te, length=False),
        ),
        ("body longer than declared", post(VALID, ("Content-Length", "10"), length=False)),
    ]
    return [Probe("oversized bodies", label, data) for label, data in cases]


def bad_headers() -> list[Probe]:
    get = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"

    def many(n: int) -> bytes:
        return get + b"".join(b"X-H-%d: v\r\n" % i for i in range(n)) + b"\r\n"

    long_path = b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    expect = request("POST", "/v1/tasks", VALID, (("Expect", "100-continue"),))
    cases: list[tuple[str, bytes]] = [
        ("64 KB header", get + b"X-Big: " + b"v" * 65_536 + b"\r\n\r\n"),
        ("1 MB header", get + b"X-Big: " + b"v" * 1_000_000 + b"\r\n\r\n"),
        *[("200 headers", many(200)), ("10,000 headers", many(10_000))],
        ("space in name", get + b"Bad Header: x\r\n\r\n"),
        ("UTF-8 name", get + "X-\u00dc: 1\r\n\r\n".encode()),
        ("NUL in value", get + b"X-A: a\x00b\r\n\r\n"),
        ("CR in value", get + b"X-A: a\rb\r\n\r\n"),
        ("obs-fold", get + b"X-A: 1\r\n  continued\r\n\r\n"),
        ("no colon", get + b"NoColon\r\n\r\n"),
        ("no Host", b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n"),
        ("two Hosts", get + b"Host: evil.example\r\n\r\n"),
        ("UTF-8 Host", b"GET /health HTTP/1.1\r\nHost: \xc3\xa9vil\r\nConnection: close\r\n\r\n"),
        ("100 KB path", long_path),
        ("HTTP/1.0", b"GET /health HTTP/1.0\r\n\r\n"),
        ("HTTP/2.0 line", b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n"),
        ("HTTP/9.9", b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n"),
        ("HTTP/0.9", b"GET /health\r\n\r\n"),
        ("h2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        ("TLS hello", bytes.fromhex("16030100a5010000a10303") + bytes(range(160))),
        ("garbage", bytes(range(1, 256)) + b"\r\n\r\n"),
        ("only CRLFs", b"\r\n" * 100),
        ("LF line ends", b"GET /health HTTP/1.1\nHost: x\nConnection: close\n\n"),
        ("Expect 100-continue", expect),
        ("Expect garbage", request("POST", "/v1/tasks", VALID, (("Expect", "\u00e9"),))),
        ("X-Forwarded-For garbage", get + b"X-Forwarded-For: not an ip, , ,\r\n\r\n"),
        ("X-Forwarded-For huge", get + b"X-Forwarded-For: " + b"1.2.3.4, " * 5000 + b"\r\n\r\n"),
        ("X-Forwarded odd", get + b"X-Forwarded-Proto: js\r\nX-Forwarded-Host: \xff\r\n\r\n"),
        ("Forwarded odd", get + b'Forwarded: for="[::1"; proto=\xff\r\n\r\n'),
        ("Authorization unicode", get + "Authorization: Bearer \u043a\u043b\r\n\r\n".encode()),
        ("Authorization huge", get + b"Authorization: Bearer " + b"k" * 50_000 + b"\r\n\r\n"),
        ("Accept-Encoding odd", get + b"Accept-Encoding: gzip;q=NaN, *;q=-1\r\n\r\n"),
        ("Range odd", get + b"Range: bytes=9-1,--,\xff\r\n\r\n"),
    ]
    return [Probe("headers", label, data) for label, data in cases]


def cut_uploads() -> list[Probe]:
    def head(n: int) -> bytes:
        return b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % n

    te = b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    cases: list[tuple[str, bytes]] = [
        ("headers only, 500 declared", head(500)),
        ("100 of 500 bytes", head(500) + VALID[:100]),
        ("all but one byte", head(len(VALID)) + VALID[:-1]),
        ("half a request line", b"POST /v1/ta"),
        ("headers unfinished", b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Len"),
        ("chunk size only", te + b"40\r\n"),
        ("half a chunk", te + b"40\r\n" + VALID[:20]),
        ("no last chunk", te + _chunked(VALID)[:-5]),
        ("500 KB of 1 MB", head(1_000_000) + b"x" * 500_000),
        ("events, headers unfinished", b"GET /v1/tasks/x/events HTTP/1.1\r\nLast-Event-ID: 1"),
    ]
    return [Probe("cut uploads", label, data, cut=True) for label, data in cases]


def qstash() -> list[Probe]:
    jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJVcHN0YXNoIn0.c2lnbmF0dXJl"
    signatures = [None, "x", "a.b.c", "eyJhbGciOiJub25lIn0.eyJpc3MiOiJVcHN0YXNoIn0.", jwt]
    signatures += ["eyJhbGciOiJIUzI1NiJ9." + "e" * 100_000 + ".x", "\u043a\u043b", "Bearer x"]
    probes = []
    headers: Headers
    for sig in signatures:
        headers = (("Upstash-Signature", sig),) if sig is not None else ()
        label = "no signature" if sig is None else f"signature {sig[:20]!r}"
        probes.append(Probe("QStash", label, request("POST", "/v1/qstash", VALID, headers)))
    for message_id in (ARABIC_DIGITS[1:4], "a" * 10_000, "\u0000", "../../x"):
        headers = (("Upstash-Signature", "x"), ("Upstash-Message-Id", message_id))
        label = f"message id {message_id[:12]!r}"
        probes.append(Probe("QStash", label, request("POST", "/v1/qstash", VALID, headers)))
    return probes


def fixed_probes(task_id: str, port: int) -> list[Probe]:
    """Every fixed case; ``task_id`` names a finished task (for its event stream) and
    ``port`` a loopback port callbacks must never reach."""
    return [
        *bad_json(),
        *wrong_types(),
        *bad_inputs(),
        *unknown_fields(),
        *huge_and_unicode(),
        *deep_nesting(),
        *control_characters(),
        *content_types(),
        *event_ids(task_id),
        *callback_urls(port),
        *methods_and_paths(task_id),
        *oversized(),
        *bad_headers(),
        *cut_uploads(),
        *qstash(),
    ]


# -- random ones ---------------------------------------------------------------------

ALPHABETS = ["abcxyz", "0123456789", ARABIC_DIGITS, FULLWIDTH_DIGITS, BOLD_DIGITS]
ALPHABETS += ["-+. :/@#%?*[]{}", "\u0000\t\r\n\u001b\u007f", "\u00e9\u952e\U0001f642\u202e\u200b"]


def random_text(rng: random.Random, max_len: int = 40) -> str:
    return "".join(rng.choice(rng.choice(ALPHABETS)) for _ in range(rng.randint(0, max_len)))


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([0, -1, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30])
    if kind == 1:
        return rng.choice([0.5, -0.0, 1e-300, 1e308, 86400.5, 3.14])
    if kind == 2:
        return rng.choice([True, False])
    if kind == 3:
        return None
    if kind in (4, 5):
        return random_text(rng, rng.choice([5, 40, 300]))
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {random_text(rng, 8): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def random_submission(rng: random.Random) -> Probe:
    body: dict[str, Any] = dict(BASE)
    for name in rng.sample(FIELDS, rng.randint(1, 3)):
        body[name] = random_value(rng)
    if rng.random() < 0.2:
        body[random_text(rng, 12)] = random_value(rng)
    if rng.random() < 0.1:
        body.pop("kind", None)
    raw = bytearray(dumps(body, ascii_only=rng.random() < 0.5))
    label = "mutated fields"
    if rng.random() < 0.15:
        i = rng.randrange(len(raw))
        change = rng.randrange(3)
        if change == 0:
            del raw[i:]
        elif change == 1:
            raw[i] = rng.randrange(256)
        else:
            raw.insert(i, rng.randrange(256))
        label = "mutated bytes"
    ct = b"application/json" if rng.random() < 0.85 else rng.choice(CONTENT_TYPES)
    return post_task("random submissions", label, bytes(raw), content_type=ct)


def random_event_id(rng: random.Random, task_id: str) -> Probe:
    pieces = ["0123456789", ARABIC_DIGITS, FULLWIDTH_DIGITS, BOLD_DIGITS, "- +ex"]
    text = "".join(rng.choice(rng.choice(pieces)) for _ in range(rng.randint(1, 25)))
    return events_probe(task_id, text, rng.choice(["query", "header"]), "random event ids")


def random_callback(rng: random.Random, port: int) -> Probe:
    octets = [127, 0, 0, 1]
    forms = [
        str(2130706433),
        hex(2130706433),
        ".".join("0" + oct(o)[2:] for o in octets),
        ".".join(hex(o) for o in octets),
        "127.1",
        "127.0.1",
        random_text(rng, 20),
    ]
    url = f"http://{rng.choice(forms)}" + (f":{port}" if rng.random() < 0.7 else "") + "/ssrf"
    return post_task("random callback URLs", url[:48], dumps(with_field("callback_url", url)))


def random_method_path(rng: random.Random) -> Probe:
    method = rng.choice(METHODS[:10])
    parts = [urllib.parse.quote(random_text(rng, 10), safe="") for _ in range(rng.randint(0, 4))]
    path = ("/v1/tasks/" if rng.random() < 0.5 else "/") + "/".join(parts)
    label = f"{method} {path[:30]}"
    return Probe("random methods and paths", label, request(method, path, content_type=None))


def random_probes(rng: random.Random, n: int, task_id: str, port: int) -> list[Probe]:
    probes = []
    for _ in range(n):
        draw = rng.random()
        if draw < 0.5:
            probes.append(random_submission(rng))
        elif draw < 0.65:
            probes.append(random_event_id(rng, task_id))
        elif draw < 0.85:
            probes.append(random_callback(rng, port))
        else:
            probes.append(random_method_path(rng))
    return probes


def generate(seed: int, quick: bool, task_id: str, port: int) -> list[Probe]:
    """The probes of one run: every fixed case plus random ones (full); or every event
    id, callback URL and deep nesting case and a sample that takes from each other
    category in turn (quick). The same seed gives the same probes."""
    rng = random.Random(seed)
    fixed = fixed_probes(task_id, port)
    if not quick:
        return fixed + random_probes(rng, max(300, FULL_SIZE - len(fixed)), task_id, port)
    sample = event_ids(task_id) + callback_urls(port) + deep_nesting()
    by_category: dict[str, list[Probe]] = {}
    for probe in fixed + random_probes(rng, 100, task_id, port):
        if probe not in sample:
            by_category.setdefault(probe.category, []).append(probe)
    for probes in by_category.values():
        rng.shuffle(probes)
    while len(sample) < QUICK_SIZE and any(by_category.values()):
        for probes in by_category.values():
            if probes and len(sample) < QUICK_SIZE:
                sample.append(probes.pop())
    return sample
