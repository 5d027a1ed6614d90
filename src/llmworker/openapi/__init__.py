"""The HTTP contract as OpenAPI 3.1 (``GET /openapi.json``), built from the pydantic
models: the submission is the :class:`~llmworker.record.TaskSpec` admission validates;
the answers are the models below, which tests check the real answers against."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from llmworker import __version__, errors
from llmworker.auth import TENANT_RE
from llmworker.handlers import registry
from llmworker.httpapp import NON_RETRYABLE_STATUS
from llmworker.observe.snapshot import Lane
from llmworker.openapi.accounts import ACCOUNT_MODELS, CostToday, account_paths
from llmworker.openapi.parts import AUTHED, REF, Open, error_answers, json_body
from llmworker.record import ID_RE, TaskSpec
from llmworker.settings import Settings


class QStashDelivery(Open):
    message_id: str
    retried: int


class CallbackState(Open):
    status: Literal["waiting", "pending", "delivered", "published", "retry", "failed"]
    attempts: int
    error: str | None


class CostTokens(Open):
    input: int = Field(description="Every input token.")
    cached_input: int = Field(description="The input tokens read from the provider's cache.")
    output: int = Field(description="Every output token.")
    reasoning: int = Field(description="The output tokens spent thinking.")


class Cost(Open):
    """A run's usage and price (USD), as its provider reported it or, for calls cut short
    after they streamed, estimated."""

    usd: float | None = Field(description="Null for a model with no known price.")
    source: str | None = Field(description="genai-prices <version>, or PRICE_<MODEL>.")
    estimated: bool
    tokens: CostTokens


class Tried(Open):
    """One model a task went through, and how it left it (or ended on it)."""

    model: str
    outcome: str = Field(
        description="rate_limited, circuit_open, unavailable, context (it moved on), "
        "spilled (it waited too long for this model), or the final status."
    )
    error: str | None = Field(None, description="The error code that moved it, if any.")


class TaskRecord(Open):
    """A task as ``POST``/``GET /v1/tasks`` answer it, and as the callback and the last
    event carry it. ``result`` and ``error`` stay null until a final state."""

    id: str
    kind: str | None
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None
    user: str
    tier: str | None
    model: str | None = Field(description="The model that ran (or runs) the task.")
    models: list[str] | None = Field(
        None, description="A task with several models: all of them, first choice first."
    )
    tried: list[Tried] | None = Field(
        None, description="A task with several models: each it went through, in order."
    )
    attempts: int
    result: Any = Field(description="The handler's result (chat: content, model, usage ...).")
    error: dict[str, Any] | None = Field(description="{code, message, ...} when it failed.")
    usage: dict[str, Any] | None
    cost: Cost | None = Field(
        None, description="What the run used by type and cost, once it used anything."
    )
    created_at: str | None = Field(description="ISO 8601 UTC")
    started_at: str | None
    finished_at: str | None
    queue_s: float | None
    run_s: float | None
    idempotency_key: str | None
    tenant: str
    callback_url: str | None
    metadata: dict[str, Any] | None
    retry_of: str | None = Field(None, description="The task this one retries.")
    retried_as: str | None = Field(None, description="The latest retry of this task.")
    qstash: QStashDelivery | None = None
    callback: CallbackState | None = None


def _error_codes() -> list[str]:
    codes = {
        code
        for cls in _subclasses(errors.RequestError)
        if isinstance(code := getattr(cls, "code", None), str)
    }
    checks = ("missing", "malformed", "expired", "not_yet_valid", "issuer", "subject")
    codes |= {f"signature_{c}" for c in (*checks, "body_mismatch", "invalid", "replayed")}
    return sorted(codes | {"not_found", "method_not_allowed", "http_error", "unavailable"})


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


class ErrorAnswer(Open):
    """Every refusal: a code to branch on and a sentence a person can act on."""

    error: str = Field(description="A machine-readable code (see the list in this schema).")
    message: str
    field: str | None = Field(None, description="The field that is wrong (422).")
    retry_after: int | None = Field(None, description="Seconds to wait (429).")
    tier: str | None = None
    quota: str | None = Field(None, description="quota_exceeded: the limit used up.")
    limit: float | None = None
    used: float | None = Field(None, description="quota_exceeded: used and reserved.")
    credits: str | None = Field(None, description="insufficient_credits: usd or tokens.")
    available: float | None = None
    need: float | None = Field(None, description="What the task may take.")


class StatusEvent(Open):
    """``event: status``: the task changed state. ``run`` numbers the runs: a reader
    that showed a previous run's text drops it."""

    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    attempts: int
    run: int | None = None
    error: dict[str, Any] | None = None


class TextEvent(Open):
    """``event: tokens`` (the answer) and ``event: reasoning``: text since the last one."""

    text: str
    n: int = Field(description="How many streamed pieces the text joins.")


class Throughput(Open):
    start: str | None
    minute_s: int
    succeeded: list[int]
    failed: list[int]
    cancelled: list[int]


class ProviderHealth(Open):
    window_s: int
    requests: dict[str, int]
    duration_p50_s: float | None
    duration_p95_s: float | None
    ttft_p50_s: float | None
    ttft_p95_s: float | None


class RunningTask(Open):
    id: str
    tenant: str
    kind: str | None
    tier: str | None
    model: str | None
    user: str
    started_at: str | None
    attempts: int
    run_s: float


class Stats(Open):
    """The deployment as Redis holds it (every replica answers the same) and this
    replica's own counts."""

    now: str | None
    lanes: list[Lane]
    throughput: Throughput
    providers: dict[str, ProviderHealth]
    running_tasks: list[RunningTask]
    queues: dict[str, dict[str, Any]]
    running: int
    callbacks_waiting: int
    guards: dict[str, dict[str, Any]]
    user_limits: dict[str, int]
    replicas_alive: int
    cost_today: CostToday
    held: dict[str, float] = Field(
        default_factory=dict,
        description="Models whose provider asked to wait: seconds until they take tasks again.",
    )
    replica: dict[str, Any]


class FailedTask(Open):
    id: str
    tenant: str
    kind: str
    tier: str
    model: str
    user: str
    status: Literal["failed", "cancelled"]
    error: dict[str, Any] | None
    finished_at: str | None
    attempts: int
    retried_as: str | None = None


class Failures(Open):
    failures: list[FailedTask]
    facets: dict[str, list[str]]


class Health(Open):
    status: Literal["ok"]


class Readiness(Open):
    status: Literal["ready", "not_ready"]
    reason: str | None = None


MODELS: list[type[BaseModel]] = [
    TaskSpec,
    TaskRecord,
    ErrorAnswer,
    StatusEvent,
    TextEvent,
    Stats,
    Failures,
    Health,
    Readiness,
    *ACCOUNT_MODELS,
]

TASK_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "The task's id (as its tenant knows it).",
    "schema": {"type": "string", "pattern": ID_RE.pattern},
}
# An event's id: where a stream resumes.
EVENT_ID = {"type": "string", "pattern": "^[0-9]{1,20}(-[0-9]{1,20})?$"}
# One event of the stream, as it arrives: its type, its id and its data, JSON whose
# schema each type names (``contentSchema``).
SSE_EVENT: dict[str, Any] = {
    "oneOf": [
        {
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": {"const": event},
                "id": {"type": "string"},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": schema,
                },
                "retry": {"type": "integer"},
            },
        }
        for event, schema in (
            ("status", {"$ref": REF.format(model="StatusEvent")}),
            ("tokens", {"$ref": REF.format(model="TextEvent")}),
            ("reasoning", {"$ref": REF.format(model="TextEvent")}),
            ("progress", {"type": "object"}),
            ("record", {"$ref": REF.format(model="TaskRecord")}),
        )
    ]
}
# From a submission's answer to what can be done with the task.
TASK_LINKS = {
    name: {"operationId": operation, "parameters": {"id": "$response.body#/id"}}
    for name, operation in (
        ("GetTask", "getTask"),
        ("CancelTask", "cancelTask"),
        ("TaskEvents", "taskEvents"),
        ("RetryTask", "retryTask"),
    )
}


def _tenant(settings: Settings) -> dict[str, Any]:
    # The tenants are not listed: the document is public, the tenants are the admin's.
    return {
        "name": "tenant",
        "in": "query",
        "required": False,
        "description": "Admin keys: act for this tenant (an unknown one is a 400 that names "
        "the tenants).",
        "schema": {"type": "string", "pattern": TENANT_RE.pattern},
    }


def _submission(settings: Settings) -> dict[str, Any]:
    example = {
        "kind": "chat",
        "input": {"messages": [{"role": "user", "content": "Say hello in French."}]},
        "user": "user-42",
        "tier": settings.tier_names[0],
    }
    return {
        "required": True,
        "content": {
            "application/json": {**json_body("TaskSpec")["application/json"], "example": example}
        },
    }


def _task_answer(description: str, status: str = "200") -> dict[str, Any]:
    return {status: {"description": description, "content": json_body("TaskRecord")}}


def _paths(settings: Settings) -> dict[str, Any]:
    tenant = _tenant(settings)
    admitted = _task_answer("Admitted: the new task.", "202")
    admitted["202"]["links"] = TASK_LINKS
    submitted = {
        **admitted,
        **_task_answer("The same id or idempotency key was admitted before: that task."),
        **error_answers(*AUTHED, 402, 413, 415, 422, 429, 503),
    }
    events_doc = (
        "Server-Sent Events: `status` (StatusEvent), `progress` (the handler's JSON), "
        "`tokens` and `reasoning` (TextEvent), and last `record` (TaskRecord), each with "
        "an `id:` to resume from (`Last-Event-ID`, or `?after=`). The first event is the "
        "task's status when the reader came; a reader who comes mid-answer gets the text "
        "so far in one `tokens` event, then the rest. A comment line (`: ping`) every 15 s "
        "keeps proxies from closing the stream."
    )
    open_: dict[str, Any] = {"security": []}
    return {
        "/v1/tasks": {
            "post": {
                "operationId": "submitTask",
                "summary": "Submit a task",
                "parameters": [tenant],
                "requestBody": _submission(settings),
                "responses": submitted,
            },
            "get": {
                "operationId": "findTask",
                "summary": "Find the caller's task by its idempotency key",
                "parameters": [
                    {
                        "name": "idempotency_key",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                    tenant,
                ],
                "responses": {**_task_answer("The task."), **error_answers(*AUTHED, 404, 503)},
            },
        },
        "/v1/tasks/{id}": {
            "parameters": [TASK_ID, tenant],
            "get": {
                "operationId": "getTask",
                "summary": "A task's record",
                "responses": {**_task_answer("The task."), **error_answers(*AUTHED, 404, 503)},
            },
            "delete": {
                "operationId": "cancelTask",
                "summary": "Cancel a task (a finished one stays as it is)",
                "responses": {
                    **_task_answer("The task after the cancel."),
                    **error_answers(*AUTHED, 404, 503),
                },
            },
        },
        "/v1/tasks/{id}/retry": {
            "parameters": [TASK_ID, tenant],
            "post": {
                "operationId": "retryTask",
                "summary": "A new task from a finished task's input",
                "description": "The new task's `retry_of` names the old one, the old one's "
                "`retried_as` the new one. Once per task: a second retry answers 200 with the "
                "first retry. Sent as JSON (`Content-Type: application/json`, the body `{}`), "
                "as a submission is: a browser's cross-site form cannot send it.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    **_task_answer("The new task.", "202"),
                    **_task_answer("The task was retried before: that retry."),
                    **error_answers(*AUTHED, 402, 404, 409, 415, 422, 429, 503),
                },
            },
        },
        "/v1/tasks/{id}/events": {
            "parameters": [TASK_ID, tenant],
            "get": {
                "operationId": "taskEvents",
                "summary": "The task's events, live",
                "description": events_doc,
                "parameters": [
                    {"name": "after", "in": "query", "schema": EVENT_ID},
                    {"name": "Last-Event-ID", "in": "header", "schema": EVENT_ID},
                ],
                "responses": {
                    "200": {
                        "description": events_doc,
                        "content": {"text/event-stream": {"schema": SSE_EVENT}},
                    },
                    **error_answers(*AUTHED, 404, 503),
                },
                "x-events": {
                    "status": {"$ref": REF.format(model="StatusEvent")},
                    "tokens": {"$ref": REF.format(model="TextEvent")},
                    "reasoning": {"$ref": REF.format(model="TextEvent")},
                    "progress": {"type": "object"},
                    "record": {"$ref": REF.format(model="TaskRecord")},
                },
            },
        },
        "/v1/qstash": {
            "post": {
                "operationId": "qstashDelivery",
                "summary": "A task delivered by Upstash QStash",
                "description": "Verified by `Upstash-Signature` (QSTASH_*_SIGNING_KEY); "
                "`Upstash-Message-Id` is the idempotency key. Tasks of QSTASH_TENANT.",
                "security": [],
                "parameters": [
                    {"name": "Upstash-Signature", "in": "header", "schema": {"type": "string"}},
                    {"name": "Upstash-Message-Id", "in": "header", "schema": {"type": "string"}},
                ],
                "requestBody": _submission(settings),
                "responses": {**submitted, **error_answers(NON_RETRYABLE_STATUS)},
            }
        },
        "/v1/stats": {
            "get": {
                "operationId": "stats",
                "summary": "Queues, guards, throughput, provider health (admin)",
                "responses": {
                    "200": {"description": "The deployment.", "content": json_body("Stats")},
                    **error_answers(*AUTHED, 503),
                },
            }
        },
        **account_paths(tenant),
        "/v1/failures": {
            "get": {
                "operationId": "failures",
                "summary": "The latest tasks that failed or were cancelled (admin)",
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["failed", "cancelled"]},
                    },
                    {"name": "model", "in": "query", "schema": {"type": "string"}},
                    {"name": "error", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 500},
                    },
                    tenant,
                ],
                "responses": {
                    "200": {"description": "Newest first.", "content": json_body("Failures")},
                    **error_answers(*AUTHED, 503),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics (an admin key unless METRICS_PUBLIC)",
                "responses": {
                    "200": {
                        "description": "Prometheus text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **error_answers(*AUTHED, 404),
                },
            }
        },
        "/health": {
            "get": {
                "operationId": "health",
                "summary": "Liveness",
                **open_,
                "responses": {"200": {"description": "Serving.", "content": json_body("Health")}},
            }
        },
        "/ready": {
            "get": {
                "operationId": "ready",
                "summary": "Readiness: Redis answers and the replica is not draining",
                **open_,
                "responses": {
                    "200": {"description": "Ready.", "content": json_body("Readiness")},
                    "503": {"description": "Not ready.", "content": json_body("Readiness")},
                },
            }
        },
    }


def document(settings: Settings) -> dict[str, Any]:
    """The document for this worker's kinds, tiers and models (built once per app)."""
    kinds = registry.names
    _, defs = models_json_schema([(m, "serialization") for m in MODELS], ref_template=REF)
    schemas: dict[str, Any] = defs["$defs"]
    spec = schemas["TaskSpec"]["properties"]
    spec["kind"]["examples"] = list(kinds)
    spec["tier"]["examples"] = [*settings.tier_names]
    spec["model"]["examples"] = sorted(settings.available_models)
    schemas["ErrorAnswer"]["properties"]["error"]["examples"] = _error_codes()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llmworker",
            "version": __version__,
            "description": "Slow LLM jobs for web apps: admitted by tier, queued durably, "
            "run within every concurrency guard, streamed, reported. Errors are "
            "`{error, message}` plus what helps (`field`, `retry_after`).",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}, {}],
        "paths": _paths(settings),
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API_KEYS entry (tenants) or an ADMIN_KEYS entry; none "
                    "when the worker has no keys (loopback only).",
                }
            },
        },
    }
