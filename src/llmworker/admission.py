"""Admission: a submission becomes a queued task, or a clear refusal.

Checks, in order: the body's shape (record.py), the kind, the tier, the models (named,
one or a list; or ROUTE_<KIND>_<TIER>; or the kind's own route for the tier; or the
default), the kind's input; then one script admits it, idempotently (by id, then by
idempotency key), under the tier's cap, and within the user's quota and credits, whose
share it reserves (quotas.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from pydantic import ValidationError

from llmworker.auth import DEFAULT_TENANT, public_id, scoped, task_ref
from llmworker.errors import InvalidField, QueueFull
from llmworker.handlers import Registry
from llmworker.notify import check_callback_url
from llmworker.observe import tracing
from llmworker.observe.metrics import Metrics, NoMetrics
from llmworker.queue import Queue
from llmworker.quotas import refusal, terms
from llmworker.record import TaskSpec, invalid_field, new_task_id
from llmworker.settings import Settings, env_token
from llmworker.usage import Pricing, estimate_tokens

# The most output a task's max_tokens reserves in a TPM window.
MAX_RESERVED_OUTPUT = 10_000_000


class Admitter:
    def __init__(
        self,
        settings: Settings,
        queue: Queue,
        registry: Registry,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or NoMetrics()
        self.queue = queue
        self.registry = registry
        # Derived once: the settings' properties recompute on every access.
        self._available = set(settings.available_models)
        self._tiers = settings.tier_names
        self._fallback_model = settings.fallback_model
        self._counts_tokens = bool(settings.rates.tpm)
        self.pricing = Pricing(settings)
        self.on_admitted: Callable[[], None] = lambda: None

    def resolve(self, spec: TaskSpec) -> tuple[str, list[str], Any]:
        """The task's tier, models (first choice first) and validated input;
        :class:`InvalidField` if any is wrong."""
        handler = self.registry.get(spec.kind)
        if handler is None:
            kinds = ", ".join(self.registry.names)
            raise InvalidField("kind", f"Unknown kind {spec.kind!r}; this worker runs: {kinds}.")
        tier = spec.tier or self.settings.default_tier
        if tier not in self._tiers:
            tiers = ", ".join(self._tiers)
            raise InvalidField("tier", f"Unknown tier {tier!r}; the tiers are: {tiers}.")
        if isinstance(spec.model, list):
            models = spec.model
        elif spec.model:
            models = [spec.model]
        else:
            route = self.settings.rates.route(spec.kind, tier)
            models = list(route) if route else [handler.model_for(tier) or self._fallback_model]
        for model in models:
            self._check_model(model, tier)
        if spec.callback_url is not None:
            check_callback_url(spec.callback_url, self.settings)
        value = spec.input
        if handler.input_model is not None:
            try:
                value = handler.input_model.model_validate(value).model_dump(exclude_none=True)
            except ValidationError as exc:
                raise invalid_field(exc, "input.", handler.input_noun) from None
        return tier, models, value

    def _check_model(self, model: str, tier: str) -> None:
        if model not in self.settings.models:
            models = ", ".join(sorted(self._available))
            raise InvalidField(
                "model",
                f"Unknown model {model!r}; available models: {models} (the built-in aliases "
                "ds-chat, ds-reasoner, gemini-flash, glm-flash and gpt come with their "
                "provider's key; MODEL_<ALIAS>=<provider>/<model> adds one).",
            )
        if model not in self._available:
            provider = self.settings.models[model].provider
            raise InvalidField(
                "model",
                f"Model {model!r} needs {env_token(provider)}_API_KEY, which this worker does not have.",
            )
        if self.settings.model_limit(model, tier) <= 0:
            raise InvalidField(
                "model",
                f"Model {model!r} takes no {tier} tasks: "
                f"MAX_{env_token(model)}_{env_token(tier)} is 0.",
            )

    async def submit(
        self,
        spec: TaskSpec,
        tenant: str = DEFAULT_TENANT,
        extra: dict[str, str] | None = None,
        source: str = "api",
    ) -> tuple[str, dict[str, str] | None]:
        """Queue a task of ``tenant``. Returns its stored id (see auth.py) and, when it is
        new, its stored fields (None: the tenant's task with the same id or idempotency
        key was found instead). Raises :class:`QueueFull` at the tier's cap. ``extra``:
        more fields to store (how it was delivered); ``source``: api, qstash or handler
        (the metrics' label)."""
        tier, models, value = self.resolve(spec)
        model = models[0]
        task_id = task_ref(tenant, spec.id or new_task_id())
        idem = scoped(tenant, spec.idempotency_key) if spec.idempotency_key else ""
        user = scoped(tenant, spec.user)
        fields = {"input": _stored_json("input", value), **(extra or {})}
        if tenant != DEFAULT_TENANT:
            fields["tenant"] = tenant
        if spec.callback_url:
            fields["callback_url"] = spec.callback_url
        if spec.timeout_s is not None:
            fields["timeout_s"] = repr(spec.timeout_s)
        if spec.metadata:
            fields["metadata"] = _stored_json("metadata", spec.metadata)
        if trace := tracing.current():
            fields["trace"] = trace
        if len(models) > 1:
            fields["models"] = ",".join(models)
        est_in = estimate_tokens(fields["input"])
        max_out = _output_bound(value)
        if self._counts_tokens and any(m in self.settings.rates.tpm for m in models):
            # What TPM_* reserves when the task is claimed (settled to what it used).
            fields["est_in"] = str(est_in)
            if max_out:
                fields["max_out"] = str(max_out)
        # The queue's calendar: the windows a task reserves in are those its end settles.
        books = self.queue.calendar.books()
        # The dearest of the task's models: it may end up on any of them.
        prices = max((self.pricing.unit_prices(m, books.now) for m in models), key=sum)
        quota = terms(books, self.settings.quotas.get(tier, {}), est_in, max_out, prices)
        cap = self.settings.queue_caps[tier]
        admission = await self.queue.admit(
            task_id=task_id,
            idempotency_key=idem,
            kind=spec.kind,
            tier=tier,
            model=model,
            user=user,
            cap=cap,
            lane_limit=self.settings.model_limit(model, tier),
            fields=fields,
            terms=quota,
        )
        if admission.outcome == "full":
            raise QueueFull(tier, cap, self.settings.queue_full_retry_after_s)
        if admission.outcome == "refused":
            raise refusal(list(admission.refusal), books, bounded=max_out > 0)
        if admission.outcome == "exists":
            return admission.task_id, None
        self.metrics.submitted(tier, model, source)
        self.on_admitted()
        # As stored by admit.lua: the caller can answer without reading it back.
        stored = {
            **fields,
            "id": task_id,
            "kind": spec.kind,
            "tier": tier,
            "model": model,
            "user": user,
            "idem": idem,
            "status": "queued",
            "attempts": "0",
            "created_at": str(admission.created_at_ms),
        }
        return task_id, stored

    async def submit_json(self, body: dict[str, Any], tenant: str = DEFAULT_TENANT) -> str:
        """Queue a task from a dict (follow-up tasks from handlers); its id."""
        try:
            spec = TaskSpec.model_validate(body)
        except ValidationError as exc:
            raise invalid_field(exc) from None
        task_id, _ = await self.submit(spec, tenant, source="handler")
        return public_id(task_id)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _output_bound(value: Any) -> int:
    """The most output a task's input allows (0: it names no bound): ``max_tokens`` or
    ``max_completion_tokens``, times its choices ``n``. A handler's own input may name
    any number: what a window or a quota reserves is bounded (the scripts add it up as
    an integer)."""
    if not isinstance(value, dict):
        return 0
    bounds = [
        int(value[k]) for k in ("max_tokens", "max_completion_tokens") if _whole(value.get(k))
    ]
    if not bounds:
        return 0
    choices = int(value["n"]) if _whole(value.get("n")) else 1
    return min(max(bounds) * choices, MAX_RESERVED_OUTPUT)


def _stored_json(field: str, value: Any) -> str:
    """A field as stored; JSON nested deeper than orjson writes (254 levels) is the
    submitter's mistake, not the worker's."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError as exc:
        raise InvalidField(field, f"The field {field!r} cannot be stored: {exc}.") from None
