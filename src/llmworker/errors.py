"""Every error llmworker raises on purpose, in one place.

    LLMWorkerError
    ├── ConfigError            invalid settings; carries one line per problem
    ├── RequestError           a client's request cannot be accepted (mapped to HTTP in api.py)
    │   ├── BadRequest         400: not JSON, not an object
    │   ├── InvalidField       422: a field is missing or wrong; names the field
    │   │   └── TaskOverQuota  the task alone may take more than the user's whole limit
    │   ├── Unauthorized       401: no or wrong API key
    │   ├── Forbidden          403: the key may not do this (another tenant, admin only)
    │   ├── NotJSON            415: the body is not declared as application/json
    │   ├── ClientGone         499: the client went away before its request was read
    │   ├── BodyTooLarge       413: body past MAX_BODY_BYTES
    │   ├── NotFound           404: unknown or expired task (or a switched-off endpoint)
    │   ├── NotFinished        409: the task must be final first (retry)
    │   ├── QueueFull          429: the tier's queue is at its cap; carries retry_after_s
    │   ├── QuotaExceeded      429: the user's quota window is used up, until it resets
    │   ├── InsufficientCredits 402: the user's prepaid credits do not cover the task
    │   ├── SignatureInvalid   401: a QStash delivery failed one check; the code names it
    │   └── NotConfigured      503: the endpoint needs settings this worker lacks
    ├── TaskError              a run ended badly; becomes the task record's ``error``
    │   ├── ProviderError      the LLM provider failed (translated once, in providers/)
    │   │   └── ModelPaused    it asked to wait long enough to give the slot back
    │   ├── TaskTimeout        the task's deadline passed
    │   ├── LeaseLost          the run kept no lease (its replica stalled or died too often)
    │   └── HandlerError       the user's handler raised
    ├── EmbeddedRedisError     the embedded Redis could not start
    └── StartupError           serve cannot start: Redis unreachable, port in use

Each carries a short machine-readable ``code`` and a message a person can act on.
"""

from __future__ import annotations

from typing import Any


def _amount(value: float) -> str:
    """A count or an amount of USD as a person writes it (no exponents)."""
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.9f}".rstrip("0")


class LLMWorkerError(Exception):
    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.code}: {self.message}>"


class ConfigError(LLMWorkerError):
    """Invalid configuration: ``problems`` holds one line per problem."""

    code = "config"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class RequestError(LLMWorkerError):
    status = 400
    code = "bad_request"

    def extra(self) -> dict[str, Any]:
        """Fields added to the JSON error answer beside ``error`` and ``message``."""
        return {}


class BadRequest(RequestError):
    status = 400
    code = "bad_request"


class InvalidField(RequestError):
    status = 422
    code = "invalid_field"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def extra(self) -> dict[str, Any]:
        return {"field": self.field}


class Unauthorized(RequestError):
    status = 401
    code = "unauthorized"


class Forbidden(RequestError):
    status = 403
    code = "forbidden"


class NotJSON(RequestError):
    status = 415
    code = "unsupported_media_type"


class ClientGone(RequestError):
    """The client disconnected mid-upload: nobody is left to answer (logged at DEBUG)."""

    status = 499
    code = "client_disconnected"


class BodyTooLarge(RequestError):
    status = 413
    code = "body_too_large"


class NotFound(RequestError):
    status = 404
    code = "not_found"


class NotFinished(RequestError):
    status = 409
    code = "not_finished"


class QueueFull(RequestError):
    status = 429
    code = "queue_full"

    def __init__(self, tier: str, cap: int, retry_after_s: int) -> None:
        super().__init__(
            f"The {tier!r} queue holds its maximum of {cap} waiting tasks; "
            f"retry after {retry_after_s} s or raise QUEUE_MAX_{tier.upper()}."
        )
        self.tier = tier
        self.cap = cap
        self.retry_after_s = retry_after_s

    def extra(self) -> dict[str, Any]:
        return {"retry_after": self.retry_after_s, "tier": self.tier}


class QuotaExceeded(RequestError):
    status = 429
    code = "quota_exceeded"

    def __init__(
        self, limit: str, allowed: float, taken: float, need: float, retry_after_s: int
    ) -> None:
        unit = limit.split("_", 1)[0]
        super().__init__(
            f"The user's quota {limit} is used up: {_amount(taken)} of {_amount(allowed)} {unit} "
            f"are used or reserved, and this task may take {_amount(need)}. It resets in "
            f"{retry_after_s} s."
        )
        self.limit = limit
        self.allowed = allowed
        self.taken = taken
        self.need = need
        self.retry_after_s = retry_after_s

    def extra(self) -> dict[str, Any]:
        return {
            "retry_after": self.retry_after_s,
            "quota": self.limit,
            "limit": self.allowed,
            "used": self.taken,
        }


class TaskOverQuota(InvalidField):
    """The task alone may take more than the user's whole limit: refused after any reset
    too (422, not retried)."""

    code = "task_over_quota"

    def __init__(self, limit: str, allowed: float, need: float, bounded: bool) -> None:
        unit = limit.split("_", 1)[0]
        if allowed == 0:
            why = f"the user's {limit} is 0"
        else:
            why = f"the user's whole {limit} is {_amount(allowed)}"
        if unit == "tasks" or allowed == 0:
            hint = "raise the user's limit"
        elif bounded:
            hint = "lower the task's max_tokens, or raise the limit"
        else:
            hint = "set a smaller max_tokens (the estimate uses the model's usual output), or raise the limit"
        super().__init__(
            "input.max_tokens" if bounded and unit != "tasks" else "user",
            f"This task may take {_amount(need)} {unit} and {why}: {hint}.",
        )
        self.limit = limit
        self.allowed = allowed
        self.need = need

    def extra(self) -> dict[str, Any]:
        return {**super().extra(), "quota": self.limit, "limit": self.allowed, "need": self.need}


class InsufficientCredits(RequestError):
    status = 402
    code = "insufficient_credits"

    def __init__(self, unit: str, left: float, need: float) -> None:
        super().__init__(
            f"The user's prepaid credits do not cover this task: {_amount(left)} {unit} left, "
            f"the task may take {_amount(need)}. Add credits (POST /v1/users/{{user}}/credits)."
        )
        self.unit = unit
        self.left = left
        self.need = need

    def extra(self) -> dict[str, Any]:
        return {"credits": self.unit, "available": self.left, "need": self.need}


class SignatureInvalid(RequestError):
    """An ``Upstash-Signature`` failed a check; ``code`` says which (``signature_expired``,
    ``signature_body_mismatch`` ...)."""

    status = 401

    def __init__(self, check: str, message: str) -> None:
        super().__init__(message)
        self.code = f"signature_{check}"


class NotConfigured(RequestError):
    status = 503
    code = "not_configured"


class TaskError(LLMWorkerError):
    code = "task_failed"

    def to_record(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


class ProviderError(TaskError):
    """A provider call failed. ``retryable`` errors are retried within the task's deadline."""

    code = "provider_error"

    def __init__(
        self,
        message: str,
        *,
        code: str = "provider_error",
        status: int | None = None,
        retryable: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.retryable = retryable
        self.retry_after_s = retry_after_s

    def to_record(self) -> dict[str, Any]:
        record = super().to_record()
        if self.status is not None:
            record["status"] = self.status
        return record


class ModelPaused(ProviderError):
    """The provider asked to wait (a 429's ``Retry-After``) before this run's first call
    got anywhere: the run gives its task and slots back and the model's dispatch is held
    for ``wait_s`` (executor.py), instead of the run sleeping on its slots."""

    def __init__(self, cause: ProviderError, wait_s: float) -> None:
        super().__init__(
            cause.message,
            code=cause.code,
            status=cause.status,
            retryable=True,
            retry_after_s=wait_s,
        )
        self.wait_s = wait_s


class TaskTimeout(TaskError):
    code = "timeout"


class LeaseLost(TaskError):
    code = "lease_expired"


class HandlerError(TaskError):
    code = "handler_error"


class EmbeddedRedisError(LLMWorkerError):
    code = "embedded_redis"


class StartupError(LLMWorkerError):
    """``serve`` cannot start; the message says what to fix."""

    code = "startup"
