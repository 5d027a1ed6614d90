"""The one settings object, read from the environment and ``.env``.

Names follow the deployment guide's ``.env`` (``MAX_DS_CHAT_PAID``, ``QUEUE_MAX_FREE``,
``DEEPSEEK_API_KEY`` ...). Besides the declared fields, four families of names are
read by pattern, because their names carry data:

- ``MAX_<MODEL>_<TIER>``   slots per model alias and tier (``MAX_DS_CHAT_PAID=10``)
- ``MAX_<MODEL>``          slots per model alias over all tiers (optional)
- ``MAX_USER_<TIER>``      concurrent tasks per user of a tier
- ``QUEUE_MAX_<TIER>``     waiting tasks per tier before 429
- ``TIER_WEIGHT_<TIER>``   dispatch weight of a tier
- ``MODEL_<ALIAS>``        a new alias: ``<provider>/<model name>``
- ``<PROVIDER>_BASE_URL`` / ``<PROVIDER>_API_KEY``: a provider endpoint

Every problem found is reported as one line of :class:`~llmworker.errors.ConfigError`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from llmworker.errors import ConfigError

FAKE_PROVIDER = "fake"


@dataclass(frozen=True)
class Provider:
    """An OpenAI-compatible endpoint."""

    name: str
    base_url: str
    api_key: str | None
    needs_key: bool = True

    @property
    def available(self) -> bool:
        return self.name == FAKE_PROVIDER or self.api_key is not None or not self.needs_key


@dataclass(frozen=True)
class ModelAlias:
    """What a task's ``model`` names: a provider and the provider's model name."""

    alias: str
    provider: str
    model: str

    @property
    def env_name(self) -> str:
        """``ds-chat`` -> ``DS_CHAT``, the form used in ``MAX_<MODEL>_<TIER>``."""
        return env_token(self.alias)


# Built-in providers: their base URLs and the env names of their keys.
BUILTIN_PROVIDERS: dict[str, tuple[str, str]] = {
    "deepseek": ("https://api.deepseek.com", "DEEPSEEK"),
    "gemini": ("https://generativelanguage.googleapis.com/v1beta/openai/", "GEMINI"),
    "zhipuai": ("https://open.bigmodel.cn/api/paas/v4/", "ZHIPUAI"),
    "openai": ("https://api.openai.com/v1", "OPENAI"),
}

BUILTIN_ALIASES: dict[str, tuple[str, str]] = {
    "ds-chat": ("deepseek", "deepseek-chat"),
    "ds-reasoner": ("deepseek", "deepseek-reasoner"),
    "gemini-flash": ("gemini", "gemini-2.5-flash"),
    "glm-flash": ("zhipuai", "glm-4-flash"),
    "gpt": ("openai", "gpt-4o-mini"),
    "fake": (FAKE_PROVIDER, "fake"),
}

# Defaults when the environment names no limit: generous for paid, modest for free.
DEFAULT_MODEL_LIMIT = {"paid": 10, "free": 3}
DEFAULT_USER_LIMIT = {"paid": 5, "free": 1}
DEFAULT_QUEUE_MAX = {"paid": 1000, "free": 200}
DEFAULT_TIER_WEIGHT = {"paid": 4, "free": 1}
FALLBACK_MODEL_LIMIT = 3
FALLBACK_USER_LIMIT = 1
FALLBACK_QUEUE_MAX = 100

# Fields built from name patterns, never read under their own names.
DYNAMIC_FIELDS = (
    "providers",
    "models",
    "model_limits",
    "model_total_limits",
    "user_limits",
    "queue_caps",
    "tier_weights",
)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def env_token(name: str) -> str:
    return name.upper().replace("-", "_").replace(".", "_")


class Settings(BaseSettings):
    """Everything llmworker reads from its environment. Build with :func:`load_settings`."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings() reads the environment and .env itself (names carry data, see
        # the module docstring) and passes every value in: nothing is read twice.
        return (init_settings,)

    port: int = Field(8080, ge=1, le=65535)
    host: str = "0.0.0.0"
    redis_url: str | None = None
    redis_prefix: str = "llmworker"
    embedded_redis_dir: Path = Path(".llmworker/redis")
    api_keys: str = ""
    public_url: str | None = None
    qstash_current_signing_key: str | None = None
    qstash_next_signing_key: str | None = None
    qstash_url: str | None = None
    qstash_token: str | None = None
    # Seconds a QStash signature's exp/nbf/iat may be off by (the clocks of two machines).
    qstash_clock_leeway_s: float = Field(60.0, ge=0, le=3600)
    # Development only (with LLMWORKER_ENV=development): accept unsigned deliveries.
    qstash_skip_verify: bool = False
    llmworker_env: Literal["production", "development"] = "production"
    callback_secret: str | None = None
    # Hosts callbacks may go to ("app.example.com", "*.example.com", "10.0.0.5:3000");
    # empty: any host whose addresses are all public.
    callback_allowed_hosts: str = ""
    # "direct": llmworker POSTs and retries; "qstash": published through QStash, which
    # retries (needs QSTASH_TOKEN).
    callback_via: Literal["direct", "qstash"] = "direct"
    callback_timeout_s: float = Field(10.0, gt=0)
    # The first retry waits about this long; each next one twice as long (at most 10 min).
    callback_backoff_s: float = Field(2.0, gt=0)
    # Failed deliveries are retried with backoff until this long after the final state.
    callback_deadline_s: float = Field(86400.0, gt=0)
    cors_origin: str | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"] = (
        "INFO"
    )
    log_format: Literal["json", "console"] = "console"

    tiers: str = "paid,free"
    default_tier: str = "free"
    default_model: str | None = None
    lease_ttl_s: float = Field(30.0, gt=0.5, le=3600)
    max_attempts: int = Field(3, ge=1, le=100)
    result_ttl_s: int = Field(86400, ge=1)
    shutdown_grace_s: float = Field(30.0, ge=0)
    task_timeout_s: float = Field(600.0, gt=0)
    max_body_bytes: int = Field(1_048_576, ge=256)
    worker_concurrency: int = Field(1000, ge=1)
    # Tasks one claim may take: larger batches amortise the round trip when many slots
    # are free; the claim holds Redis for about 50 us per task.
    claim_batch: int = Field(128, ge=1, le=1000)
    provider_timeout_s: float = Field(120.0, gt=0)
    # How llmworker speaks to providers: "direct" (its own client on aiohttp) or
    # "openai" (the official SDK); see llm.py.
    provider_client: Literal["direct", "openai"] = "direct"
    task_modules: str = ""
    fake_latency_ms: float = Field(400.0, ge=0)
    fake_tokens: int = Field(24, ge=0)
    redis_connect_timeout_s: float = Field(30.0, ge=0)
    redis_timeout_s: float = Field(10.0, gt=0)
    queue_full_retry_after_s: int = Field(5, ge=1)

    # Filled from the pattern families above by load_settings().
    providers: dict[str, Provider] = Field(default_factory=dict)
    models: dict[str, ModelAlias] = Field(default_factory=dict)
    model_limits: dict[str, dict[str, int]] = Field(default_factory=dict)
    model_total_limits: dict[str, int] = Field(default_factory=dict)
    user_limits: dict[str, int] = Field(default_factory=dict)
    queue_caps: dict[str, int] = Field(default_factory=dict)
    tier_weights: dict[str, int] = Field(default_factory=dict)

    @field_validator(
        "redis_url",
        "public_url",
        "default_model",
        "cors_origin",
        "qstash_current_signing_key",
        "qstash_next_signing_key",
        "qstash_token",
        "qstash_url",
        "callback_secret",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # "REDIS_URL=" in a .env file means "not set", as in a shell.
        return None if value == "" else value

    @field_validator("redis_prefix")
    @classmethod
    def _prefix_has_no_braces(cls, value: str) -> str:
        if not value or "{" in value or "}" in value or len(value) > 64:
            raise ValueError("must be 1-64 characters without braces")
        return value

    @property
    def tier_names(self) -> list[str]:
        return [t.strip().lower() for t in self.tiers.split(",") if t.strip()]

    @property
    def qstash_keys(self) -> list[str]:
        """The signing keys a delivery may be signed with: the current one, then the next."""
        return [k for k in (self.qstash_current_signing_key, self.qstash_next_signing_key) if k]

    @property
    def callback_hosts(self) -> list[str]:
        return [h.strip().lower() for h in self.callback_allowed_hosts.split(",") if h.strip()]

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @property
    def available_models(self) -> list[str]:
        return [a for a, m in self.models.items() if self.providers[m.provider].available]

    @property
    def real_models_available(self) -> bool:
        return any(a != "fake" for a in self.available_models)

    @property
    def fallback_model(self) -> str:
        """The model a task gets when it names none and its kind has no route."""
        if self.default_model:
            return self.default_model
        for alias in ("ds-chat", *self.available_models):
            if alias in self.available_models and alias != "fake":
                return alias
        return "fake"

    def model_limit(self, model: str, tier: str) -> int:
        return self.model_limits.get(model, {}).get(tier, 0)

    def redacted(self) -> dict[str, Any]:
        """Settings fit for a log line: secrets replaced by whether they are set."""
        data = self.model_dump(
            exclude={"providers", "models", "api_keys", "callback_secret", "qstash_token"}
        )
        for key in ("qstash_current_signing_key", "qstash_next_signing_key"):
            data[key] = bool(data[key])
        data["api_keys"] = len(self.api_key_list)
        data["models"] = {a: f"{m.provider}/{m.model}" for a, m in self.models.items()}
        return data


def _read_environment(
    environ: Mapping[str, str] | None, env_file: str | Path | None
) -> dict[str, str]:
    """The process environment over the ``.env`` file, keys in capitals."""
    merged: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        source = DotEnvSettingsSource(Settings, env_file=env_file)
        merged.update({k.upper(): v for k, v in source.env_vars.items() if v is not None})
    env = os.environ if environ is None else environ
    merged.update({k.upper(): v for k, v in env.items()})
    return merged


def _positive_int(name: str, raw: str, problems: list[str], *, minimum: int = 0) -> int | None:
    try:
        value = int(raw.strip())
    except ValueError:
        problems.append(f"{name}={raw!r} is not a whole number")
        return None
    if value < minimum:
        problems.append(f"{name}={value} must be at least {minimum}")
        return None
    return value


def _providers(env: dict[str, str], problems: list[str]) -> dict[str, Provider]:
    providers = {FAKE_PROVIDER: Provider(FAKE_PROVIDER, "", None, needs_key=False)}
    for name, (default_url, prefix) in BUILTIN_PROVIDERS.items():
        key = env.get(f"{prefix}_API_KEY") or None
        providers[name] = Provider(name, env.get(f"{prefix}_BASE_URL") or default_url, key)
    # Any other <NAME>_BASE_URL declares a provider (vLLM, Ollama, a gateway ...);
    # a local endpoint may need no key.
    for var, url in env.items():
        if not var.endswith("_BASE_URL") or var.startswith(("QSTASH_", "PUBLIC_")):
            continue
        prefix = var.removesuffix("_BASE_URL")
        name = prefix.lower().replace("_", "-")
        if name == FAKE_PROVIDER:
            problems.append(
                f"{var}: 'fake' is the built-in simulated model; name the provider otherwise"
            )
            continue
        if name in providers or any(p == prefix for _, p in BUILTIN_PROVIDERS.values()):
            continue
        if not url.startswith(("http://", "https://")):
            problems.append(f"{var}={url!r} must be an http:// or https:// URL")
            continue
        providers[name] = Provider(name, url, env.get(f"{prefix}_API_KEY") or None, needs_key=False)
    return providers


def _models(
    env: dict[str, str], providers: dict[str, Provider], problems: list[str]
) -> dict[str, ModelAlias]:
    models = {a: ModelAlias(a, p, m) for a, (p, m) in BUILTIN_ALIASES.items()}
    for var, spec in env.items():
        if not var.startswith("MODEL_") or var == "MODEL_":
            continue
        alias = var.removeprefix("MODEL_").lower().replace("_", "-")
        provider, sep, model = spec.partition("/")
        if not sep or not model:
            problems.append(
                f"{var}={spec!r} must be <provider>/<model name>, e.g. deepseek/deepseek-chat"
            )
        elif provider not in providers:
            known = ", ".join(sorted(providers))
            problems.append(
                f"{var} names provider {provider!r}, which is not defined "
                f"(known: {known}; define one with {env_token(provider)}_BASE_URL)"
            )
        else:
            models[alias] = ModelAlias(alias, provider, model)
    return models


def _limits(
    env: dict[str, str],
    declared: set[str],
    tiers: list[str],
    models: dict[str, ModelAlias],
    problems: list[str],
) -> dict[str, Any]:
    tier_suffixes = {f"_{env_token(t)}": t for t in tiers}
    users = {t: DEFAULT_USER_LIMIT.get(t, FALLBACK_USER_LIMIT) for t in tiers}
    caps = {t: DEFAULT_QUEUE_MAX.get(t, FALLBACK_QUEUE_MAX) for t in tiers}
    weights = {t: DEFAULT_TIER_WEIGHT.get(t, 1) for t in tiers}
    # Families named <PREFIX><TIER>: where each goes and its smallest value.
    per_tier: dict[str, tuple[dict[str, int], int]] = {
        "QUEUE_MAX_": (caps, 0),
        "TIER_WEIGHT_": (weights, 1),
        "MAX_USER_": (users, 1),
    }
    per_model = _ModelLimits(tiers, tier_suffixes, models, problems)
    for var, raw in sorted(env.items()):
        if var.lower() in declared:
            continue
        prefix = next((p for p in per_tier if var.startswith(p)), None)
        if prefix is not None:
            target, minimum = per_tier[prefix]
            tier = tier_suffixes.get("_" + var.removeprefix(prefix))
            if tier is None:
                problems.append(
                    f"{var} names tier {var.removeprefix(prefix).lower()!r}, "
                    f"which is not in TIERS ({', '.join(tiers)})"
                )
            value = _positive_int(var, raw, problems, minimum=minimum)
            if tier and value is not None:
                target[tier] = value
        elif var.startswith("MAX_") and len(var) > 4:
            per_model.add(var, raw)
    return {
        "model_limits": per_model.limits,
        "model_total_limits": per_model.totals,
        "user_limits": users,
        "queue_caps": caps,
        "tier_weights": weights,
    }


class _ModelLimits:
    """``MAX_<MODEL>_<TIER>`` (slots per model and tier) and ``MAX_<MODEL>`` (total)."""

    def __init__(
        self,
        tiers: list[str],
        tier_suffixes: dict[str, str],
        models: dict[str, ModelAlias],
        problems: list[str],
    ) -> None:
        self.tiers = tiers
        self.tier_suffixes = tier_suffixes
        self.models = models
        self.by_env = {m.env_name: a for a, m in models.items()}
        self.problems = problems
        self.limits = {
            a: {t: DEFAULT_MODEL_LIMIT.get(t, FALLBACK_MODEL_LIMIT) for t in tiers} for a in models
        }
        self.totals: dict[str, int] = {}

    def add(self, var: str, raw: str) -> None:
        stem = var.removeprefix("MAX_")
        value = _positive_int(var, raw, self.problems)
        if stem in self.by_env:
            if value is not None:
                self.totals[self.by_env[stem]] = value
            return
        suffix = next((s for s in self.tier_suffixes if stem.endswith(s)), None)
        alias = self.by_env.get(stem[: -len(suffix)]) if suffix else None
        if suffix is None or alias is None:
            known = ", ".join(sorted(self.models))
            self.problems.append(
                f"{var} matches no model alias and tier "
                f"(models: {known}; tiers: {', '.join(self.tiers)})"
            )
        elif value is not None:
            self.limits[alias][self.tier_suffixes[suffix]] = value


def _validate_declared(plain: dict[str, Any], problems: list[str]) -> Settings:
    """Validate the declared fields; report each bad one and carry on with its default,
    so that one start-up lists every problem at once."""
    try:
        # model_validate checks only the values given: the environment was read already.
        return Settings.model_validate(plain)
    except ValidationError as exc:
        bad = set()
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            bad.add(field)
            given = plain.get(field)
            shown = f"={given!r}" if given is not None else ""
            problems.append(f"{field.upper()}{shown}: {err['msg']}")
        return Settings.model_validate({k: v for k, v in plain.items() if k not in bad})


def _check_edges(s: Settings, problems: list[str]) -> None:
    """QStash and callback settings that only make sense together."""
    if s.qstash_skip_verify and s.llmworker_env != "development":
        problems.append(
            "QSTASH_SKIP_VERIFY=true accepts unsigned deliveries: it is honoured only with "
            "LLMWORKER_ENV=development"
        )
    if s.qstash_keys and not s.public_url and s.llmworker_env == "production":
        problems.append(
            "QSTASH_CURRENT_SIGNING_KEY is set but PUBLIC_URL is not: set it to the URL QStash "
            "publishes to (its signatures name that URL; a request's Host header proves nothing)"
        )
    if s.public_url is not None and not re.match(r"^https?://[^\s/]+", s.public_url):
        problems.append(f"PUBLIC_URL={s.public_url!r} must be an http:// or https:// URL")
    if s.callback_secret is not None:
        from llmworker.notify import signing_key

        try:
            signing_key(s.callback_secret)
        except ValueError as exc:
            problems.append(f"CALLBACK_SECRET: {exc}")
    if s.callback_deadline_s > s.result_ttl_s:
        problems.append(
            f"CALLBACK_DEADLINE_S={s.callback_deadline_s:g} is past RESULT_TTL_S={s.result_ttl_s}: "
            "a callback still being retried would lose its task record"
        )
    if s.callback_via == "qstash" and not s.qstash_token:
        problems.append("CALLBACK_VIA=qstash publishes callbacks through QStash: set QSTASH_TOKEN")


def load_settings(
    environ: Mapping[str, str] | None = None,
    env_file: str | Path | None = ".env",
    **overrides: Any,
) -> Settings:
    """Read and validate the settings; raise :class:`ConfigError` listing every problem.

    ``environ`` replaces ``os.environ`` (tests pass their own); ``overrides`` win over both.
    """
    env = _read_environment(environ, env_file)
    problems: list[str] = []
    declared = set(Settings.model_fields)
    plain = {k.lower(): v for k, v in env.items() if k.lower() in declared}
    plain.update(overrides)
    for dynamic in DYNAMIC_FIELDS:
        plain.pop(dynamic, None)
    base = _validate_declared(plain, problems)
    tiers = base.tier_names
    for tier in tiers:
        if not NAME_RE.match(tier):
            problems.append(
                f"TIERS: tier {tier!r} must be lower-case letters, digits, '-', '_' or '.'"
            )
    if len(set(tiers)) != len(tiers) or not tiers:
        problems.append(f"TIERS={base.tiers!r} must list one or more distinct tier names")
    if base.default_tier not in tiers:
        problems.append(f"DEFAULT_TIER={base.default_tier!r} is not in TIERS ({', '.join(tiers)})")
    providers = _providers(env, problems)
    models = _models(env, providers, problems)
    for alias in models:
        if not NAME_RE.match(alias):
            problems.append(
                f"model alias {alias!r} must be lower-case letters, digits, '-', '_' or '.'"
            )
    limits = _limits(env, declared, tiers, models, problems)
    if base.default_model is not None:
        if base.default_model not in models:
            problems.append(
                f"DEFAULT_MODEL={base.default_model!r} is not a model alias ({', '.join(sorted(models))})"
            )
        elif not providers[models[base.default_model].provider].available:
            problems.append(
                f"DEFAULT_MODEL={base.default_model!r} needs {env_token(models[base.default_model].provider)}_API_KEY"
            )
    _check_edges(base, problems)
    if problems:
        raise ConfigError(problems)
    return base.model_copy(update={"providers": providers, "models": models, **limits})
