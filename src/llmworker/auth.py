"""Who is calling: API keys, tenants and admin keys.

``API_KEYS`` lists bearer keys, each ``key`` or ``tenant:key`` (``appA:k1,appB:k2``). A
task belongs to the tenant whose key submitted it; another tenant never sees it (its
ids and idempotency keys live in the tenant's own namespace). Keys without a name form
the default tenant. ``ADMIN_KEYS`` see every tenant and may choose which one a request
acts for (``?tenant=``). With no key configured at all, every caller is the default
tenant's admin (a worker listening on loopback, see ``HOST``).

Tasks of the default tenant keep their ids as they are in Redis; those of a named tenant
are stored as ``<tenant>/<id>`` (an id never contains ``/``). Idempotency keys and users,
which may contain anything, are always stored as ``<tenant>/<value>``: a tenant name never
contains ``/``, so no key or user of one tenant can name another's (users have a
concurrency guard and a fair-share queue each: one tenant's "anonymous" is not
another's).
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass, field

DEFAULT_TENANT = "default"
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Shorter keys are refused: a bearer key is the only thing between the internet and the
# queue (and the provider bill).
MIN_KEY_LENGTH = 16


@dataclass(frozen=True)
class Caller:
    """The tenant a request acts for, and whether its key is an admin key."""

    tenant: str = DEFAULT_TENANT
    admin: bool = False

    def task_ref(self, task_id: str) -> str:
        """The stored id of this tenant's task ``task_id``."""
        return task_ref(self.tenant, task_id)

    def idem_ref(self, key: str) -> str:
        return scoped(self.tenant, key)


def task_ref(tenant: str, task_id: str) -> str:
    return task_id if tenant == DEFAULT_TENANT else f"{tenant}/{task_id}"


def scoped(tenant: str, value: str) -> str:
    """An idempotency key or a user as stored."""
    return f"{tenant}/{value}"


def unscoped(tenant: str, stored: str) -> str:
    """A stored idempotency key or user as its tenant gave it."""
    return stored.removeprefix(f"{tenant}/")


def public_id(ref: str) -> str:
    """A stored task id as its tenant knows it."""
    return ref.rpartition("/")[2]


@dataclass(frozen=True)
class KeyRing:
    """Every configured key and the caller it stands for."""

    keys: tuple[tuple[bytes, Caller], ...] = ()
    tenants: frozenset[str] = field(default_factory=frozenset)

    @property
    def open(self) -> bool:
        """No key is configured: requests need none."""
        return not self.keys

    @property
    def named_tenants(self) -> bool:
        return any(t != DEFAULT_TENANT for t in self.tenants)

    def caller(self, token: str) -> Caller | None:
        """The caller whose key ``token`` is, or None. Every key is compared, in constant
        time, so the answer's timing tells nothing about which keys exist."""
        given = token.encode()
        found: Caller | None = None
        for key, caller in self.keys:
            if hmac.compare_digest(given, key) and found is None:
                found = caller
        return found

    @classmethod
    def parse(cls, api_keys: str, admin_keys: str) -> tuple[KeyRing, list[str]]:
        """The key ring and one line per problem found in ``API_KEYS`` / ``ADMIN_KEYS``."""
        problems: list[str] = []
        entries: list[tuple[bytes, Caller]] = []
        seen: dict[str, str] = {}

        def add(key: str, caller: Caller, var: str) -> None:
            if len(key) < MIN_KEY_LENGTH:
                problems.append(
                    f"{var}: a key of {len(key)} characters is too short (at least "
                    f"{MIN_KEY_LENGTH}; make one with: openssl rand -hex 32)"
                )
                return
            owner = "admin" if caller.admin else caller.tenant
            if key in seen and seen[key] != owner:
                problems.append(f"{var}: one key is listed for both {seen[key]!r} and {owner!r}")
                return
            seen[key] = owner
            entries.append((key.encode(), caller))

        for entry in _entries(admin_keys):
            add(entry, Caller(DEFAULT_TENANT, admin=True), "ADMIN_KEYS")
        plain: list[str] = []
        tenants: set[str] = set()
        for entry in _entries(api_keys):
            tenant, sep, key = entry.partition(":")
            if not sep:
                tenant, key = DEFAULT_TENANT, entry
                plain.append(key)
            elif not TENANT_RE.match(tenant):
                problems.append(
                    f"API_KEYS: tenant {tenant!r} must be letters, digits, '_', '.' or '-' "
                    "(entries are key or tenant:key)"
                )
                continue
            tenants.add(tenant)
            add(key, Caller(tenant), "API_KEYS")
        # In a deployment of one tenant, that tenant's keys see everything there is.
        if not admin_keys.strip() and tenants <= {DEFAULT_TENANT}:
            entries = [(k, Caller(c.tenant, admin=True)) for k, c in entries]
        return cls(tuple(entries), frozenset(tenants)), problems


def _entries(raw: str) -> list[str]:
    return [e.strip() for e in raw.split(",") if e.strip()]


def first_key(api_keys: str, admin_keys: str = "") -> str | None:
    """The key the CLI sends by default: the first of ``ADMIN_KEYS`` (taken as written),
    else the first of ``API_KEYS`` without its tenant."""
    for entry in _entries(admin_keys):
        return entry
    for entry in _entries(api_keys):
        return entry.partition(":")[2] or entry
    return None
