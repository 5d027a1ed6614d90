"""Usage, quotas and credits in the document (accounts.py serves them)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from llmworker.accounts import MAX_TOKENS, MAX_USD
from llmworker.ledger import GROUPS, MAX_DAYS, MAX_ENTRIES
from llmworker.openapi.parts import AUTHED, Open, error_answers, json_body
from llmworker.settings.quotas import LIMITS, MAX_LIMIT


class UsageTokens(Open):
    input: int
    cached_input: int
    output: int
    reasoning: int


class UsageRow(Open):
    """Totals of one group (its key is named by ``group_by``: day, model, tier or user)."""

    day: str | None = None
    model: str | None = None
    tier: str | None = None
    user: str | None = None
    attempts: int = Field(description="Runs that finished (a task retried or rerun counts each).")
    tasks: int = Field(description="Tasks that ended (succeeded, failed, cancelled).")
    tokens: UsageTokens
    cost_usd: float
    unpriced_attempts: int = Field(
        description="Runs that used tokens of a model without a price (not in cost_usd)."
    )


class LaneCost(UsageRow):
    tier: str | None
    model: str | None


class CostToday(Open):
    """Today's runs per tier and model (the day of QUOTA_TIMEZONE)."""

    day: str
    timezone: str
    cost_usd: float
    lanes: list[LaneCost]


class Usage(Open):
    from_: str = Field(alias="from", description="The first day (YYYY-MM-DD, QUOTA_TIMEZONE).")
    to: str
    timezone: str
    group_by: str
    rows: list[UsageRow]
    total: UsageRow


class LedgerEntry(Open):
    """One finished attempt."""

    at: str = Field(description="ISO 8601 UTC")
    day: str
    task: str
    tenant: str
    user: str
    tier: str
    kind: str
    model: str
    status: str = Field(
        description="succeeded, failed, cancelled, or lapsed (its replica died; rerun)."
    )
    tokens: UsageTokens
    cost_usd: float | None
    price_source: str | None = Field(
        description="genai-prices <version>, PRICE_<MODEL>, or reservation (an estimate)."
    )
    estimated: bool


class LedgerEntries(Open):
    from_: str = Field(alias="from")
    to: str
    entries: list[LedgerEntry]
    truncated: bool = Field(description="More entries match than `limit`.")


class Measures(Open):
    tasks: float | None
    tokens: float | None
    usd: float | None


class QuotaWindow(Open):
    window: str = Field(description="The day (YYYY-MM-DD) or month (YYYY-MM).")
    resets_at: str = Field(description="ISO 8601 UTC")
    limits: Measures = Field(description="Null: no limit.")
    used: Measures
    reserved: Measures = Field(description="Held by tasks admitted and not finished.")
    remaining: Measures


class CreditBalance(Open):
    balance: float
    reserved: float
    available: float


class Credits(Open):
    usd: CreditBalance | None = None
    tokens: CreditBalance | None = None


class Quota(Open):
    user: str
    tier: str
    timezone: str
    own_limits: dict[str, float] = Field(description="The user's own limits (PUT).")
    day: QuotaWindow
    month: QuotaWindow
    credits: Credits | None = Field(description="Null: the user holds no credits.")


class CreditsAdded(Open):
    applied: bool = Field(description="False: this reference was applied before.")
    credits: Credits | None


class OwnLimits(BaseModel):
    """A user's own limits; null or absent: the tier's (QUOTA_<TIER>_...)."""

    tasks_per_day: int | None = Field(None, ge=0, le=MAX_LIMIT)
    tokens_per_day: int | None = Field(None, ge=0, le=MAX_LIMIT)
    usd_per_day: float | None = Field(None, ge=0, le=MAX_LIMIT)
    tasks_per_month: int | None = Field(None, ge=0, le=MAX_LIMIT)
    tokens_per_month: int | None = Field(None, ge=0, le=MAX_LIMIT)
    usd_per_month: float | None = Field(None, ge=0, le=MAX_LIMIT)


class CreditTopUp(BaseModel):
    """Prepaid credit: USD, tokens or both (negative takes credit back)."""

    usd: float | None = Field(None, ge=-MAX_USD, le=MAX_USD)
    tokens: int | None = Field(None, ge=-MAX_TOKENS, le=MAX_TOKENS)
    reference: str | None = Field(
        None,
        max_length=200,
        description="Applied once per reference for 90 days (a payment's id); without one, "
        "every request adds again.",
    )


ACCOUNT_MODELS: list[type[BaseModel]] = [
    Usage,
    LedgerEntries,
    Quota,
    CreditsAdded,
    OwnLimits,
    CreditTopUp,
]
assert set(OwnLimits.model_fields) == set(LIMITS)


def account_paths(tenant: dict[str, Any]) -> dict[str, Any]:
    days = [
        {
            "name": name,
            "in": "query",
            "description": f"A day (YYYY-MM-DD) or days back (7d); at most {MAX_DAYS} days.",
            "schema": {"type": "string"},
        }
        for name in ("from", "to")
    ]
    user_query = {"name": "user", "in": "query", "schema": {"type": "string", "maxLength": 200}}
    user = {
        "name": "user",
        "in": "path",
        "required": True,
        "description": "The user as the tenant names it ('/' allowed, as such or as %2F).",
        "schema": {"type": "string", "minLength": 1, "maxLength": 200},
    }
    tier = {"name": "tier", "in": "query", "description": "Whose defaults (DEFAULT_TIER).",
            "schema": {"type": "string"}}  # fmt: skip

    def body(name: str) -> dict[str, Any]:
        return {"required": True, "content": json_body(name)}

    return {
        "/v1/usage": {
            "get": {
                "operationId": "usage",
                "summary": "Tokens and cost totals by day, model, tier or user",
                "description": "A tenant's key sees its own users; an admin key everyone's "
                "(one tenant's with ?tenant=).",
                "parameters": [
                    *days,
                    {
                        "name": "group_by",
                        "in": "query",
                        "schema": {"type": "string", "enum": list(GROUPS)},
                    },
                    user_query,
                    {"name": "tier", "in": "query", "schema": {"type": "string"}},
                    {"name": "model", "in": "query", "schema": {"type": "string"}},
                    tenant,
                ],
                "responses": {
                    "200": {"description": "Totals.", "content": json_body("Usage")},
                    **error_answers(*AUTHED, 503),
                },
            }
        },
        "/v1/usage/entries": {
            "get": {
                "operationId": "usageEntries",
                "summary": "The ledger: one entry per finished attempt, oldest first",
                "parameters": [
                    *days,
                    user_query,
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ENTRIES},
                    },
                    tenant,
                ],
                "responses": {
                    "200": {"description": "Entries.", "content": json_body("LedgerEntries")},
                    **error_answers(*AUTHED, 503),
                },
            }
        },
        "/v1/users/{user}/quota": {
            "parameters": [user, tenant],
            "get": {
                "operationId": "getQuota",
                "summary": "A user's limits, used, reserved and remaining, and credits",
                "parameters": [tier],
                "responses": {
                    "200": {"description": "The quota.", "content": json_body("Quota")},
                    **error_answers(*AUTHED, 404, 422, 503),
                },
            },
            "put": {
                "operationId": "setQuota",
                "summary": "Set a user's own limits (admin)",
                "parameters": [tier],
                "requestBody": body("OwnLimits"),
                "responses": {
                    "200": {"description": "The quota.", "content": json_body("Quota")},
                    **error_answers(*AUTHED, 404, 413, 415, 422, 503),
                },
            },
        },
        "/v1/users/{user}/credits": {
            "parameters": [user, tenant],
            "post": {
                "operationId": "addCredits",
                "summary": "Add prepaid credit, once per reference (admin)",
                "requestBody": body("CreditTopUp"),
                "responses": {
                    "200": {"description": "The balance.", "content": json_body("CreditsAdded")},
                    **error_answers(*AUTHED, 404, 413, 415, 422, 503),
                },
            },
        },
    }
