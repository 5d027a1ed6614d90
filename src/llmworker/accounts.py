"""The HTTP side of usage, quotas and credits (ledger.py, quotas.py).

- ``GET /v1/usage``: totals by day, model, tier or user over a range of days; a tenant's
  key sees its own users, an admin key everyone's (or one tenant's with ``?tenant=``).
- ``GET /v1/usage/entries``: the ledger's entries (an export).
- ``GET /v1/users/{user}/quota``: limits, used, reserved and remaining, and credits.
- ``PUT /v1/users/{user}/quota`` (admin): the user's own limits.
- ``POST /v1/users/{user}/credits`` (admin): prepaid USD or tokens.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from llmworker.auth import Caller, scoped
from llmworker.errors import BadRequest, Forbidden, InvalidField
from llmworker.httpapp import JSON, read_body, require_json
from llmworker.ledger import GROUPS, MAX_DAYS, MAX_ENTRIES, Scope, days_between
from llmworker.quotas import read_limits
from llmworker.record import CONTROL_RE
from llmworker.usage import NANO

if TYPE_CHECKING:
    from llmworker.api import Api

# The longest user id (record.py) and reference accepted.
MAX_USER = 200
MAX_REFERENCE = 200
# The furthest back a day may be named as days back (ten years).
MAX_BACK = 3660
# The most one top-up adds (or takes back): balances stay well inside Redis's integers.
MAX_USD = 1_000_000
MAX_TOKENS = 10**12


class Accounts:
    def __init__(self, api: Api) -> None:
        self.api = api
        self.worker = api.worker
        self.settings = api.settings

    # -- who asks, about whom -------------------------------------------------------

    def _scope(self, request: Request, caller: Caller) -> Scope:
        """An admin key without ?tenant= sees every tenant; any other caller its own."""
        if caller.admin and "tenant" not in request.query_params:
            return Scope(None)
        return Scope(caller.tenant)

    @staticmethod
    def _user(request: Request, caller: Caller) -> str:
        user = request.path_params["user"]
        if not 1 <= len(user) <= MAX_USER or CONTROL_RE.search(user) or "\ufffd" in user:
            raise InvalidField(
                "user",
                f"A user id is 1 to {MAX_USER} characters of UTF-8, without control characters.",
            )
        return scoped(caller.tenant, user)

    @staticmethod
    def _user_filter(request: Request, caller: Caller, scope: Scope) -> str:
        """``?user=`` as stored: as the tenant names it, or for an admin who sees every
        tenant, as the answers show it (``<tenant>/<user>``)."""
        user = request.query_params.get("user", "")[:MAX_USER]
        if not user:
            return ""
        if scope.tenant is None and "/" in user:
            return user
        return scoped(caller.tenant, user)

    def _admin(self, request: Request, what: str) -> Caller:
        caller = self.api.authorize(request)
        if not caller.admin:
            raise Forbidden(f"{what} needs an admin key (ADMIN_KEYS).")
        return caller

    def _days(self, request: Request) -> tuple[date, date]:
        q = request.query_params
        today = date.fromisoformat(self.worker.queue.calendar.day())
        last = _date(q.get("to"), "to", today)
        first = _date(q.get("from"), "from", last)
        if first > last:
            raise BadRequest(f"?from={first} is after ?to={last}.")
        if (last - first).days >= MAX_DAYS:
            raise BadRequest(f"Ask for at most {MAX_DAYS} days at once.")
        return first, last

    # -- endpoints ----------------------------------------------------------------------

    async def usage(self, request: Request) -> Response:
        caller = self.api.authorize(request)
        q = request.query_params
        group_by = q.get("group_by", "day")
        if group_by not in GROUPS:
            raise BadRequest(f"?group_by={group_by[:30]!r}: use {', '.join(GROUPS)}.")
        first, last = self._days(request)
        scope = self._scope(request, caller)
        answer = await self.worker.ledger.totals(
            days_between(first, last),
            scope,
            group_by,
            user=self._user_filter(request, caller, scope),
            tier=q.get("tier", "")[:64],
            model=q.get("model", "")[:64],
        )
        return JSON(answer)

    async def entries(self, request: Request) -> Response:
        caller = self.api.authorize(request)
        q = request.query_params
        first, last = self._days(request)
        raw_limit = q.get("limit", str(MAX_ENTRIES))
        if (
            not raw_limit.isascii()
            or not raw_limit.isdigit()
            or not 1 <= int(raw_limit) <= MAX_ENTRIES
        ):
            raise BadRequest(f"?limit={raw_limit[:30]!r}: a whole number from 1 to {MAX_ENTRIES}.")
        scope = self._scope(request, caller)
        limit = int(raw_limit)
        found = await self.worker.ledger.entries(
            first,
            last,
            scope,
            user=self._user_filter(request, caller, scope),
            tier=q.get("tier", "")[:64],
            model=q.get("model", "")[:64],
            limit=limit + 1,
        )
        return JSON(
            {
                "from": first.isoformat(),
                "to": last.isoformat(),
                "entries": found[:limit],
                # More entries match: ask again from the last one's day, or narrow it.
                "truncated": len(found) > limit,
            }
        )

    async def quota(self, request: Request) -> Response:
        caller = self.api.authorize(request)
        return JSON(await self._view(request, caller))

    async def set_quota(self, request: Request) -> Response:
        caller = self._admin(request, "Setting a user's quota")
        limits = read_limits(await self._json(request))
        await self.worker.quotas.set_own(self._user(request, caller), limits)
        return JSON(await self._view(request, caller))

    async def add_credits(self, request: Request) -> Response:
        caller = self._admin(request, "Adding credits")
        body = await self._json(request)
        if not isinstance(body, dict):
            raise BadRequest('The body must be a JSON object: {"usd": 5} or {"tokens": 100000}.')
        unknown = set(body) - {"usd", "tokens", "reference"}
        if unknown:
            name = sorted(unknown)[0]
            raise InvalidField(name, f"Unknown field {name[:60]!r}; use usd, tokens and reference.")
        usd, tokens = body.get("usd") or 0, body.get("tokens") or 0
        if isinstance(usd, bool) or not isinstance(usd, int | float) or not abs(usd) <= MAX_USD:
            raise InvalidField(
                "usd",
                f"usd must be a number of USD up to {MAX_USD:g} (negative takes credit back).",
            )
        if isinstance(tokens, bool) or not isinstance(tokens, int) or abs(tokens) > MAX_TOKENS:
            raise InvalidField(
                "tokens", "tokens must be a whole number (negative takes credit back)."
            )
        if not round(usd * NANO) and not tokens:
            raise InvalidField(
                "usd", 'Name an amount (a nano-USD or more): {"usd": 5} or {"tokens": 100000}.'
            )
        reference = body.get("reference") or ""
        if not isinstance(reference, str) or len(reference) > MAX_REFERENCE:
            raise InvalidField(
                "reference", f"reference must be a string of at most {MAX_REFERENCE} characters."
            )
        applied = await self.worker.quotas.add_credits(
            self._user(request, caller), float(usd), tokens, reference
        )
        view = await self._view(request, caller)
        return JSON({"applied": applied, "credits": view["credits"]}, status_code=200)

    async def _view(self, request: Request, caller: Caller) -> dict[str, Any]:
        tier = request.query_params.get("tier", self.settings.default_tier)
        if tier not in self.settings.tier_names:
            tiers = ", ".join(self.settings.tier_names)
            raise BadRequest(f"?tier={tier[:30]!r} is not a tier (tiers: {tiers}).")
        user = self._user(request, caller)
        return await self.worker.quotas.view(user, tier, request.path_params["user"])

    async def _json(self, request: Request) -> Any:
        require_json(request, "the body as JSON")
        body = await read_body(request, self.settings.max_body_bytes)
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"The body is not valid JSON: {exc}.") from None

    def routes(self) -> list[Route]:
        return [
            Route("/v1/usage", self.usage, methods=["GET"]),
            Route("/v1/usage/entries", self.entries, methods=["GET"]),
            Route("/v1/users/{user:path}/quota", self.quota, methods=["GET"]),
            Route("/v1/users/{user:path}/quota", self.set_quota, methods=["PUT"]),
            Route("/v1/users/{user:path}/credits", self.add_credits, methods=["POST"]),
        ]


def _date(raw: str | None, name: str, default: date) -> date:
    """A day: YYYY-MM-DD, or a number of days before ``default`` (``7d``)."""
    if not raw:
        return default
    wrong = BadRequest(
        f"?{name}={raw[:30]!r}: a day as YYYY-MM-DD, or days back as 7d (at most {MAX_BACK}d)."
    )
    if raw.endswith("d") and raw[:-1].isascii() and raw[:-1].isdigit():
        if len(raw) > 6 or int(raw[:-1]) > MAX_BACK:
            raise wrong
        return default - timedelta(days=int(raw[:-1]))
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise wrong from None
