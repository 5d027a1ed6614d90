"""QStash's ``Upstash-Signature``: verified on every delivery, and made by ``qstash-dev``.

The signature is a JWT signed with HS256, keyed by the signing key string itself. Its
claims: ``iss`` = "Upstash", ``sub`` = the destination URL, ``exp`` (five minutes after
signing), ``iat``, ``nbf``, ``jti``, and ``body`` = base64url SHA-256 of the raw body
(with or without ``=`` padding).

Verification works on the raw bytes before anything is parsed, tries the current key
and then the next (key rotation), and allows a clock leeway on ``exp``/``nbf``/``iat``.
Every failure names its check (:class:`~llmworker.errors.SignatureInvalid`), so a person
reading the 401 or the log line knows what to fix; no key ever appears in either.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from typing import Any

import orjson

from llmworker.errors import SignatureInvalid

ISSUER = "Upstash"
LIFETIME_S = 300


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def body_hash(body: bytes, *, padded: bool = True) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).decode()
    return digest if padded else digest.rstrip("=")


def sign(
    key: str,
    body: bytes,
    url: str,
    *,
    now: float | None = None,
    lifetime_s: int = LIFETIME_S,
    claims: dict[str, Any] | None = None,
) -> str:
    """A signature as QStash makes it (``claims`` override, for tests)."""
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "sub": url,
        "exp": issued + lifetime_s,
        "nbf": issued,
        "iat": issued,
        "jti": "jwt_" + secrets.token_hex(12),
        "body": body_hash(body),
    }
    payload.update(claims or {})
    signing_input = (
        _b64url(orjson.dumps({"alg": "HS256", "typ": "JWT"})) + "." + _b64url(orjson.dumps(payload))
    )
    mac = hmac.new(key.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64url(mac)


def verify(
    token: str | None,
    body: bytes,
    url: str,
    keys: list[str],
    *,
    leeway_s: float,
    now: float | None = None,
) -> dict[str, Any]:
    """The claims of a valid signature; :class:`SignatureInvalid` naming the failed check."""
    if not token:
        raise SignatureInvalid("missing", "The request has no Upstash-Signature header.")
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise SignatureInvalid("malformed", "The Upstash-Signature is not a JWT.")
    try:
        header = orjson.loads(_b64url_decode(parts[0]))
        claims = orjson.loads(_b64url_decode(parts[1]))
        mac = _b64url_decode(parts[2])
    except (binascii.Error, ValueError):
        raise SignatureInvalid("malformed", "The Upstash-Signature is not a JWT.") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise SignatureInvalid("malformed", "The Upstash-Signature is not a JWT.")
    # Only HS256: "none" or an asymmetric algorithm must never select how we check.
    if header.get("alg") != "HS256":
        raise SignatureInvalid(
            "algorithm",
            f"The Upstash-Signature uses {header.get('alg')!r}; only HS256 is accepted.",
        )
    signing_input = (parts[0] + "." + parts[1]).encode()
    if not any(
        hmac.compare_digest(hmac.new(k.encode(), signing_input, hashlib.sha256).digest(), mac)
        for k in keys
    ):
        raise SignatureInvalid(
            "key",
            "The Upstash-Signature was not made with QSTASH_CURRENT_SIGNING_KEY or "
            "QSTASH_NEXT_SIGNING_KEY.",
        )
    _check_claims(claims, body, url, leeway_s, time.time() if now is None else now)
    return claims


def _check_claims(
    claims: dict[str, Any], body: bytes, url: str, leeway_s: float, now: float
) -> None:
    if claims.get("iss") != ISSUER:
        raise SignatureInvalid(
            "issuer", f"The signature's issuer is {claims.get('iss')!r}, not 'Upstash'."
        )
    if claims.get("sub") != url:
        raise SignatureInvalid(
            "subject",
            f"The signature is for {claims.get('sub')!r}, not {url!r}: set PUBLIC_URL to the "
            "URL QStash publishes to.",
        )
    exp, nbf, iat = (_time_claim(claims, name) for name in ("exp", "nbf", "iat"))
    if exp is None or nbf is None:
        raise SignatureInvalid("malformed", "The signature lacks its 'exp' or 'nbf' claim.")
    if now > exp + leeway_s:
        raise SignatureInvalid(
            "expired",
            f"The signature expired {now - exp:.0f} s ago (QSTASH_CLOCK_LEEWAY_S={leeway_s:g}).",
        )
    for name, value in (("nbf", nbf), ("iat", iat)):
        if value is not None and value > now + leeway_s:
            raise SignatureInvalid(
                "not_yet_valid",
                f"The signature's {name!r} is {value - now:.0f} s in the future "
                f"(QSTASH_CLOCK_LEEWAY_S={leeway_s:g}); check this machine's clock.",
            )
    claimed = claims.get("body")
    if not isinstance(claimed, str) or not hmac.compare_digest(
        claimed.rstrip("=").encode(), body_hash(body, padded=False).encode()
    ):
        raise SignatureInvalid(
            "body_mismatch", "The body's SHA-256 differs from the signed one: it was changed."
        )


def _time_claim(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SignatureInvalid("malformed", f"The signature's {name!r} is not a number.")
    return float(value)
