"""Settings that only make sense together, checked once every field has its value."""

from __future__ import annotations

import ipaddress
import re

from yarl import URL

from llmworker.auth import TENANT_RE, KeyRing
from llmworker.settings.fields import Settings
from llmworker.webhooks import signing_key

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` serves this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_access(s: Settings, problems: list[str]) -> None:
    """Closed by default, as Redis's protected mode: beyond loopback, only with keys (or
    an explicit ALLOW_ANONYMOUS=true)."""
    ring, found = KeyRing.parse(s.api_keys, s.admin_keys)
    problems.extend(found)
    if ring.open and not found and not s.allow_anonymous and not is_loopback(s.host):
        problems.append(
            f"HOST={s.host} serves other machines, but API_KEYS is not set: set API_KEYS "
            "(make a key with: openssl rand -hex 32), "
            "listen on HOST=127.0.0.1, or set ALLOW_ANONYMOUS=true to serve without keys"
        )
    if not TENANT_RE.match(s.qstash_tenant):
        problems.append(
            f"QSTASH_TENANT={s.qstash_tenant!r} must be a tenant name "
            "(letters, digits, '_', '.' or '-')"
        )


def check_urls(s: Settings, problems: list[str]) -> None:
    if s.redis_url is not None and not s.redis_url.startswith(REDIS_SCHEMES):
        problems.append(
            f"REDIS_URL={redacted_url(s.redis_url)!r} must start with redis://, rediss:// (TLS) or "
            "unix://, e.g. redis://127.0.0.1:6379/0"
        )
    if s.public_url is not None:
        try:
            url = URL(s.public_url)
            ok = url.scheme in ("http", "https") and bool(url.host)
        except ValueError:
            ok = False
        if not ok:
            problems.append(f"PUBLIC_URL={s.public_url!r} must be an http:// or https:// URL")
        elif url.path not in ("", "/") or url.query_string or url.fragment:
            problems.append(
                f"PUBLIC_URL={s.public_url!r} must be the worker's origin only, without a path: "
                "QStash signs PUBLIC_URL + /v1/qstash, e.g. PUBLIC_URL=https://worker.example.com"
            )


def check_edges(s: Settings, problems: list[str]) -> None:
    """QStash and callback settings that only make sense together."""
    if s.qstash_skip_verify and s.llmworker_env != "development":
        problems.append(
            "QSTASH_SKIP_VERIFY=true accepts unsigned deliveries: it is honoured only with "
            "LLMWORKER_ENV=development"
        )
    if s.qstash_keys and not s.public_url and s.llmworker_env == "production":
        problems.append(
            "QSTASH_CURRENT_SIGNING_KEY is set but PUBLIC_URL is not: set it to the URL QStash "
            "publishes to (its signatures name that URL; a request's Host header proves nothing)"
        )
    if s.callback_secret is not None:
        try:
            signing_key(s.callback_secret)
        except ValueError as exc:
            problems.append(f"CALLBACK_SECRET: {exc}")
    if s.callback_deadline_s > s.result_ttl_s:
        problems.append(
            f"CALLBACK_DEADLINE_S={s.callback_deadline_s:g} is past RESULT_TTL_S={s.result_ttl_s}: "
            "a callback still being retried would lose its task record"
        )
    if s.callback_via == "qstash" and not s.qstash_token:
        problems.append("CALLBACK_VIA=qstash publishes callbacks through QStash: set QSTASH_TOKEN")


def redacted_url(url: str) -> str:
    """A URL without its password, for messages and logs."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url) if "@" in url else url
