"""What a task is: the submission a client sends, and the record everyone reads back.

(Named record, not task: ``llmworker.task`` is the decorator users import.)
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmworker.auth import DEFAULT_TENANT, public_id, unscoped
from llmworker.errors import BadRequest, InvalidField

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
# No ':' in kinds: queue keys are uq:<tier>:<model>|<kind>:<user>, and a user may contain
# ':', so the kind must not, or two (kind, user) pairs could name one queue.
KIND_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# A task names at most this many models to go through.
MAX_MODELS = 8
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


# Every pair of digits, so 10 bits turn into two characters with one lookup.
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]


def new_task_id() -> str:
    """A ULID: 48 bits of milliseconds then 80 random bits, in Crockford's base32, so ids
    sort by creation."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    # 26 digits of 5 bits hold the 128 bits (the top two are zero), 2 digits at a time.
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in range(120, -1, -10)])


class TaskSpec(BaseModel):
    """A submission (``POST /v1/tasks`` body). Checked here for shape, strictly (a number
    is never read from a string, nor a boolean from a number); the kind, model, tier and
    callback URL are checked against the configuration by admission."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: str | None = Field(None, pattern=ID_RE.pattern)
    kind: str = Field(pattern=KIND_RE.pattern)
    input: Any = Field(default_factory=dict)
    user: str = Field("anonymous", min_length=1, max_length=200)
    tier: str | None = Field(None, min_length=1, max_length=64)
    # One model alias, or several in order: the first with room runs the task, the next
    # ones take it if the first cannot (rate limited, circuit open, failing, too small).
    model: str | list[str] | None = Field(None, min_length=1, max_length=64)
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)
    callback_url: str | None = Field(None, max_length=2048)
    timeout_s: float | None = Field(None, gt=0, le=86400)
    metadata: dict[str, Any] | None = None

    @field_validator("user", "idempotency_key", "kind", "tier")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        # These end up inside Redis key names and log lines.
        if value is not None and CONTROL_RE.search(value):
            raise ValueError("must not contain control characters")
        return value

    @field_validator("model")
    @classmethod
    def _models(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):
            if len(value) > MAX_MODELS:
                raise ValueError(f"must list at most {MAX_MODELS} models")
            if len(set(value)) != len(value):
                raise ValueError("must not name a model twice")
            for name in value:
                if not 1 <= len(name) <= 64 or CONTROL_RE.search(name) or "," in name:
                    raise ValueError(f"{name!r} is not a model alias")
        elif value is not None and (CONTROL_RE.search(value) or "," in value):
            raise ValueError("must not contain control characters or commas")
        return value

    @classmethod
    def parse(cls, body: bytes, *, idempotency_key: str | None = None) -> TaskSpec:
        """Parse a raw JSON body; raise :class:`BadRequest` or :class:`InvalidField`.
        ``idempotency_key``: the key when the body names none."""
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"The body is not valid JSON: {exc}.") from None
        if not isinstance(data, dict):
            raise BadRequest("The body must be a JSON object with at least a 'kind' field.")
        if idempotency_key and data.get("idempotency_key") is None:
            data["idempotency_key"] = idempotency_key
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise invalid_field(exc) from None


TASK_FIELDS = tuple(TaskSpec.model_fields)


def invalid_field(exc: ValidationError, prefix: str = "", noun: str = "field") -> InvalidField:
    """The first problem of a pydantic error, as an :class:`InvalidField` naming its field
    (``field`` is its whole path, ``input.temperature``; the message calls it by ``noun``
    and its path below ``prefix``: "The chat parameter 'temperature' ...")."""
    err = exc.errors()[0]
    name = ".".join(str(p) for p in err["loc"])
    field = prefix + name
    # pydantic prefixes custom checks with "Value error, " and names its models: people
    # want the rule, not the machinery.
    rule = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("model_type", "dict_type", "model_attributes_type"):
        rule = "it must be a JSON object"
    if not name:  # the value itself, not one of its fields
        field = prefix.rstrip(".") or "body"
        message = f"The {field} is invalid: {rule}."
    elif err["type"] == "missing":
        message = f"The {noun} {name!r} is required."
    elif err["type"] == "extra_forbidden":
        message = f"{name!r} is not a task field; task fields are: {', '.join(TASK_FIELDS)}."
    else:
        message = f"The {noun} {name!r} is invalid: {rule}."
    return InvalidField(field, message)


def iso_ms(ms: str | int | None) -> str | None:
    """Milliseconds since the epoch as ISO 8601 UTC, e.g. ``2026-11-28T19:57:10.545Z``."""
    if ms is None or ms == "":
        return None
    seconds, millis = divmod(int(ms), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _json(raw: str | None) -> Any:
    # Stored JSON goes out as is: orjson embeds a Fragment without parsing it again.
    return orjson.Fragment(raw) if raw else None


def record_view(h: dict[str, str]) -> dict[str, Any]:
    """The public task record (DESIGN.md "Shapes") from its Redis hash: ids and keys as
    the task's tenant knows them."""
    created, started, finished = h.get("created_at"), h.get("started_at"), h.get("finished_at")
    tenant = h.get("tenant") or DEFAULT_TENANT
    queue_s = run_s = None
    if created and started:
        queue_s = round((int(started) - int(created)) / 1000, 3)
    if started and finished:
        run_s = round((int(finished) - int(started)) / 1000, 3)
    return {
        "id": public_id(h["id"]),
        "kind": h.get("kind"),
        "status": h.get("status"),
        "user": unscoped(tenant, h.get("user") or ""),
        "tier": h.get("tier"),
        "model": h.get("model"),
        **_routing(h),
        "attempts": int(h.get("attempts", 0)),
        "result": _json(h.get("result")),
        "error": _json(h.get("error")),
        "usage": _json(h.get("usage")),
        "cost": _json(h.get("cost")),
        "created_at": iso_ms(created),
        "started_at": iso_ms(started),
        "finished_at": iso_ms(finished),
        "queue_s": queue_s,
        "run_s": run_s,
        "idempotency_key": unscoped(tenant, h["idem"]) if h.get("idem") else None,
        "tenant": tenant,
        "callback_url": h.get("callback_url") or None,
        "metadata": _json(h.get("metadata")),
        **_delivery(h),
    }


def _routing(h: dict[str, str]) -> dict[str, Any]:
    """A task with several models: which, and how it went on each it left or ended on."""
    if not h.get("models"):
        return {}
    return {"models": h["models"].split(","), "tried": _json(h.get("tried")) or []}


def _delivery(h: dict[str, str]) -> dict[str, Any]:
    """How the task arrived and how its callback went, where there is something to say."""
    out: dict[str, Any] = {}
    for name in ("retry_of", "retried_as"):
        if h.get(name):
            out[name] = h[name]
    if h.get("qstash_message_id"):
        out["qstash"] = {
            "message_id": h["qstash_message_id"],
            "retried": int(h.get("qstash_retried") or 0),
        }
    if h.get("callback_url"):
        out["callback"] = {
            "status": h.get("cb_status") or "waiting",
            "attempts": int(h.get("cb_attempts") or 0),
            "error": h.get("cb_error") or None,
        }
    return out


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)
