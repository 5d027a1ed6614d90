"""Standard Webhooks signing for callbacks: the secret, the message id, the signature.

The signature is ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` keyed by
``CALLBACK_SECRET`` (a ``whsec_<base64>`` secret), derived as the ``standardwebhooks``
library derives it, so receivers verify a callback by passing the same secret to it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac


def signing_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret; ValueError for one that is not."""
    raw = secret.removeprefix("whsec_").rstrip("=")
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            "must be a Standard Webhooks secret, 'whsec_' and base64 (make one with: "
            "python -c \"import base64,os;print('whsec_'+base64.b64encode(os.urandom(32)).decode())\")"
        ) from None
    if len(key) < 16:
        raise ValueError("is too short: use at least 16 random bytes (24 base64 characters)")
    return key


def webhook_id(task_ref: str, status: str) -> str:
    """One per final state: the same on every attempt, so receivers can dedupe. A named
    tenant's tasks carry the tenant, as their stored ids do (``task_appA/<id>_<status>``:
    no id or tenant name contains ``/``, so two tenants' ids never make one webhook id)."""
    return f"task_{task_ref}_{status}"


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()
