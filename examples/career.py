"""The Node worker's two jobs as llmworker kinds (docs/migrate-from-node-worker.md): a
résumé summary, and a job match that chains from it.

Load with ``TASK_MODULES=examples.career``; route each kind per tier with
``ROUTE_RESUME_SUMMARY_PAID=ds-reasoner,ds-chat``, ``ROUTE_JOB_MATCH_FREE=ds-chat`` ...
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from llmworker import TaskContext, task
from llmworker.errors import RequestError

SUMMARY_PROMPT = (
    "Summarise this résumé for a recruiter in five bullet points: role, years of "
    "experience, strongest skills, notable results, what the person looks for next."
)
MATCH_PROMPT = (
    "Given a résumé summary and a job description, say how well they match (a score from "
    "0 to 100 on the first line), then the three strongest reasons and the main gap."
)


class SummaryInput(BaseModel):
    resume: str = Field(min_length=1, max_length=200_000)
    # With a job description, a job_match task follows the summary.
    job: str | None = Field(None, min_length=1, max_length=200_000)
    stream: bool = True


class MatchInput(BaseModel):
    summary: str = Field(min_length=1, max_length=200_000)
    job: str = Field(min_length=1, max_length=200_000)
    stream: bool = True


@task("resume_summary", input_model=SummaryInput)
async def resume_summary(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
    await ctx.progress(0.1, "reading the résumé")
    reply = await ctx.llm.chat(
        [
            {"role": "system", "content": SUMMARY_PROMPT},
            {"role": "user", "content": input["resume"]},
        ],
        stream_tokens=input["stream"],
    )
    result: dict[str, Any] = {"summary": reply.content}
    if input.get("job"):
        # Same user, tier and tenant, routed by its own kind's ROUTE_JOB_MATCH_<TIER>. The
        # key makes a rerun of this task (its process died) find the match queued before
        # instead of paying for a second; the metadata goes on (a callback_url would be
        # given here too, if the app wants one for the match).
        try:
            result["match_task"] = await ctx.submit(
                "job_match",
                {"summary": reply.content, "job": input["job"]},
                idempotency_key=f"{ctx.id}:job_match",
                metadata=ctx.metadata or None,
            )
        except RequestError as exc:
            # The summary was paid for: keep it, and say why no match follows.
            result["match_error"] = {"code": exc.code, "message": exc.message}
    return result


@task("job_match", input_model=MatchInput)
async def job_match(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
    await ctx.progress(0.1, "comparing")
    reply = await ctx.llm.chat(
        [
            {"role": "system", "content": MATCH_PROMPT},
            {
                "role": "user",
                "content": f"Résumé summary:\n{input['summary']}\n\nJob:\n{input['job']}",
            },
        ],
        stream_tokens=input["stream"],
    )
    return {"match": reply.content}
