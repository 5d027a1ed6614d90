"""What every part of the document uses: the open base model, references, error answers."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from llmworker.httpapp import NON_RETRYABLE_STATUS


class Open(BaseModel):
    # Answers may gain fields: clients must ignore what they do not know.
    model_config = ConfigDict(extra="allow")


REF = "#/components/schemas/{model}"


def json_body(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model=name)}}}


def error_answers(*statuses: int) -> dict[str, Any]:
    reasons = {
        400: "The request is malformed (the message says how).",
        401: "No valid API key (send `Authorization: Bearer <key>`).",
        403: "The key may not do this (admin only, or another tenant).",
        404: "Unknown, expired, or not the caller's.",
        409: "The task is not finished yet.",
        413: "The body is over MAX_BODY_BYTES.",
        415: "The body is not declared as application/json.",
        422: "A field is missing or wrong; `field` names it.",
        402: "The user's prepaid credits do not cover the task (`insufficient_credits`).",
        429: "The tier's queue is full (`queue_full`), or the user's quota is used up "
        "(`quota_exceeded`, until its window resets); retry after `retry_after` s (also "
        "`Retry-After`).",
        503: "Redis is unreachable, or the endpoint is not configured here.",
        NON_RETRYABLE_STATUS: "QStash: the task can never be admitted (dead-letter it).",
    }
    out: dict[str, Any] = {}
    for status in statuses:
        answer: dict[str, Any] = {
            "description": reasons[status],
            "content": json_body("ErrorAnswer"),
        }
        if status == 429:
            answer["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
        out[str(status)] = answer
    return out


# Every endpoint that reads or writes tasks may refuse for these reasons.
AUTHED = (400, 401, 403)
