"""QStash deliveries: the signature checks, and what /v1/qstash answers."""

from __future__ import annotations

import base64
import time
from typing import Any

import orjson
import pytest
from qstash import Receiver

from llmworker import signature
from llmworker.errors import SignatureInvalid

from .conftest import serve_api, wait_until

CURRENT, NEXT = "sig_7RvLmbaQ2Bf1nWyX9pKe3Zc5Hd8Tj4Ua", "sig_3Nq8WzLk5Yt2Rm9Bv6Cx1Pf4Hs7Jd0Ge"
URL = "https://worker.example.com/v1/qstash"
BODY = orjson.dumps({"kind": "chat", "input": {"messages": [{"role": "user", "content": "hi"}]}})


def verify(token: str | None, body: bytes = BODY, url: str = URL, **kw: Any) -> dict[str, Any]:
    return signature.verify(
        token, body, url, [CURRENT, NEXT], leeway_s=kw.pop("leeway_s", 30), **kw
    )


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize("key", [CURRENT, NEXT], ids=["current key", "next key (rotation)"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded hash", "unpadded hash"])
def test_a_signature_made_as_qstash_does_is_accepted_here_and_by_the_official_sdk(key, padded):
    token = signature.sign(
        key, BODY, URL, claims={"body": signature.body_hash(BODY, padded=padded)}
    )
    assert verify(token)["sub"] == URL
    Receiver(CURRENT, NEXT).verify(signature=token, body=BODY.decode(), url=URL)


def test_the_header_and_claims_follow_the_documented_scheme():
    token = signature.sign(CURRENT, BODY, URL, now=1_700_000_000)
    head, claims, _ = token.split(".")
    assert orjson.loads(base64.urlsafe_b64decode(head + "==")) == {"alg": "HS256", "typ": "JWT"}
    c = orjson.loads(base64.urlsafe_b64decode(claims + "=="))
    assert c["iss"] == "Upstash" and c["sub"] == URL and c["exp"] == 1_700_000_300
    assert c["nbf"] == c["iat"] == 1_700_000_000 and c["jti"]
    assert c["body"].rstrip("=") == b64url(__import__("hashlib").sha256(BODY).digest())


def refused(check: str, token: str | None, **kw: Any) -> None:
    with pytest.raises(SignatureInvalid) as caught:
        verify(token, **kw)
    assert caught.value.code == f"signature_{check}", caught.value.message
    for secret in (CURRENT, NEXT):
        assert secret not in caught.value.message


def test_a_changed_body_is_refused():
    refused("body_mismatch", signature.sign(CURRENT, BODY, URL), body=BODY + b" ")


def test_an_expired_signature_is_refused_past_the_leeway_only():
    old = time.time() - 400  # expired 100 s ago
    refused("expired", signature.sign(CURRENT, BODY, URL, now=old), leeway_s=30)
    assert verify(signature.sign(CURRENT, BODY, URL, now=old), leeway_s=120)


def test_a_signature_not_yet_valid_beyond_the_leeway_is_refused():
    later = time.time() + 90
    refused("not_yet_valid", signature.sign(CURRENT, BODY, URL, now=later), leeway_s=30)
    assert verify(signature.sign(CURRENT, BODY, URL, now=time.time() + 10), leeway_s=30)


def test_a_signature_for_another_url_is_refused():
    refused("subject", signature.sign(CURRENT, BODY, "https://evil.example/v1/qstash"))


def test_a_signature_with_an_unknown_key_is_refused():
    refused("key", signature.sign("some_other_key", BODY, URL))


def test_no_header_is_refused():
    refused("missing", None)
    refused("missing", "")


def test_alg_none_is_refused_even_with_valid_claims():
    payload = orjson.loads(
        base64.urlsafe_b64decode(signature.sign(CURRENT, BODY, URL).split(".")[1] + "==")
    )
    token = (
        b64url(orjson.dumps({"alg": "none", "typ": "JWT"}))
        + "."
        + b64url(orjson.dumps(payload))
        + "."
    )
    refused("algorithm", token)


def test_another_issuer_is_refused():
    refused("issuer", signature.sign(CURRENT, BODY, URL, claims={"iss": "Someone"}))


def test_garbage_is_refused_as_malformed():
    refused("malformed", "not-a-jwt")
    refused("malformed", "a.b.c")


# -- the endpoint -----------------------------------------------------------------------


def qstash_env(**extra: Any) -> dict[str, Any]:
    return {
        "QSTASH_CURRENT_SIGNING_KEY": CURRENT,
        "QSTASH_NEXT_SIGNING_KEY": NEXT,
        "PUBLIC_URL": "https://worker.example.com",
        **extra,
    }


def delivery(
    body: bytes = BODY, message_id: str = "msg_1", retried: int = 0, **kw: Any
) -> dict[str, Any]:
    return {
        "content": body,
        "headers": {
            "Upstash-Signature": signature.sign(kw.get("key", CURRENT), body, kw.get("url", URL)),
            "Upstash-Message-Id": message_id,
            "Upstash-Retried": str(retried),
            "Content-Type": "application/json",
        },
    }


async def test_a_verified_delivery_is_queued_with_its_message_id_as_idempotency_key(make_settings):
    async with serve_api(make_settings(**qstash_env()), dispatch=False) as (client, _):
        r = await client.post("/v1/qstash", **delivery(message_id="msg_abc", retried=2))
        assert r.status_code == 202, r.text
        record = r.json()
        assert record["status"] == "queued" and record["idempotency_key"] == "msg_abc"
        assert record["qstash"] == {"message_id": "msg_abc", "retried": 2}
        stored = (await client.get(f"/v1/tasks/{record['id']}")).json()
        assert stored["qstash"] == {"message_id": "msg_abc", "retried": 2}


async def test_the_body_idempotency_key_wins_over_the_message_id(make_settings):
    body = orjson.dumps({**orjson.loads(BODY), "idempotency_key": "order-7"})
    async with serve_api(make_settings(**qstash_env()), dispatch=False) as (client, _):
        r = await client.post("/v1/qstash", **delivery(body, message_id="msg_x"))
        assert r.status_code == 202 and r.json()["idempotency_key"] == "order-7"


async def test_a_duplicate_delivery_makes_one_task_and_one_provider_call(make_settings, fake_llm):
    url, fake = fake_llm
    env = qstash_env(FAKEAI_BASE_URL=url, MODEL_M1="fakeai/m1")
    body = orjson.dumps({**orjson.loads(BODY), "model": "m1"})
    async with serve_api(make_settings(**env)) as (client, _):
        first = await client.post("/v1/qstash", **delivery(body, message_id="msg_dup"))
        again = await client.post("/v1/qstash", **delivery(body, message_id="msg_dup", retried=1))
        assert (first.status_code, again.status_code) == (202, 200)
        assert first.json()["id"] == again.json()["id"]

        async def done() -> dict[str, Any] | None:
            rec = (await client.get(f"/v1/tasks/{first.json()['id']}")).json()
            return rec if rec["status"] == "succeeded" else None

        await wait_until(done)
        assert fake.calls["m1"] == 1


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{not json", "bad_request"),
        (b'{"kind": "nope"}', "invalid_field"),
        (b'{"kind": "chat", "model": "unknown-model"}', "invalid_field"),
        (b'{"kind": "chat", "input": {"messages": "x"}}', "invalid_field"),
    ],
)
async def test_a_signed_but_invalid_task_gets_489_and_goes_to_the_dead_letter_queue(
    make_settings, body, error
):
    async with serve_api(make_settings(**qstash_env()), dispatch=False) as (client, worker):
        r = await client.post("/v1/qstash", **delivery(body))
        assert r.status_code == 489
        assert r.headers["upstash-nonretryable-error"] == "true"
        assert r.json()["error"] == error and r.json()["message"]
        assert sum((await worker.queue.depths()).values()) == 0


async def test_a_full_queue_answers_429_with_retry_after(make_settings):
    env = qstash_env(QUEUE_MAX_FREE=1, QUEUE_FULL_RETRY_AFTER_S=7)
    async with serve_api(make_settings(**env), dispatch=False) as (client, _):
        assert (await client.post("/v1/qstash", **delivery(message_id="m1"))).status_code == 202
        r = await client.post("/v1/qstash", **delivery(message_id="m2"))
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        assert r.json()["error"] == "queue_full"


async def test_a_bad_signature_gets_401_naming_the_check_and_queues_nothing(make_settings):
    async with serve_api(make_settings(**qstash_env()), dispatch=False) as (client, worker):
        wrong_url = await client.post("/v1/qstash", **delivery(url="http://127.0.0.1/v1/qstash"))
        assert wrong_url.status_code == 401
        assert wrong_url.json()["error"] == "signature_subject"
        assert "PUBLIC_URL" in wrong_url.json()["message"]
        tampered = delivery()
        tampered["content"] = BODY.replace(b"hi", b"ho")
        r = await client.post("/v1/qstash", **tampered)
        assert r.json()["error"] == "signature_body_mismatch"
        r = await client.post("/v1/qstash", content=BODY)
        assert r.status_code == 401 and r.json()["error"] == "signature_missing"
        assert sum((await worker.queue.depths()).values()) == 0


async def test_without_public_url_in_development_the_request_url_is_what_must_be_signed(
    make_settings,
):
    env = qstash_env(PUBLIC_URL="", LLMWORKER_ENV="development")
    async with serve_api(make_settings(**env), dispatch=False) as (client, _):
        own = f"{client.base_url}/v1/qstash".replace("//v1", "/v1")
        assert (await client.post("/v1/qstash", **delivery(url=own))).status_code == 202


async def test_without_signing_keys_deliveries_are_refused_with_a_hint(make_settings):
    async with serve_api(make_settings(), dispatch=False) as (client, _):
        r = await client.post("/v1/qstash", **delivery())
        assert r.status_code == 503 and "QSTASH_CURRENT_SIGNING_KEY" in r.json()["message"]


async def test_unsigned_deliveries_are_accepted_only_in_development(make_settings):
    env = {"QSTASH_SKIP_VERIFY": "true", "LLMWORKER_ENV": "development"}
    async with serve_api(make_settings(**env), dispatch=False) as (client, _):
        r = await client.post("/v1/qstash", content=BODY, headers={"Upstash-Message-Id": "m"})
        assert r.status_code == 202


async def test_a_replayed_signature_is_refused_even_with_another_message_id(make_settings):
    async with serve_api(make_settings(**qstash_env()), dispatch=False) as (client, worker):
        captured = delivery(message_id="msg_1")
        assert (await client.post("/v1/qstash", **captured)).status_code == 202
        captured["headers"]["Upstash-Message-Id"] = "msg_forged"
        r = await client.post("/v1/qstash", **captured)
        assert r.status_code == 401 and r.json()["error"] == "signature_replayed"
        assert (await worker.queue.depths()).get("free") == 1


async def test_a_message_id_that_cannot_be_an_idempotency_key_is_not_retried(make_settings):
    async with serve_api(make_settings(**qstash_env()), dispatch=False) as (client, _):
        r = await client.post("/v1/qstash", **delivery(message_id="m" * 300))
        assert r.status_code == 489 and r.json()["field"] == "idempotency_key"
