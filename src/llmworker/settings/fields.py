"""The declared settings: one field per environment variable of a fixed name."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from llmworker.settings.providers import ModelAlias, Provider
from llmworker.settings.rates import Rates

# Fields built from name patterns, never read under their own names.
DYNAMIC_FIELDS = (
    "providers",
    "models",
    "model_limits",
    "model_total_limits",
    "user_limits",
    "queue_caps",
    "tier_weights",
    "rates",
    "quotas",
)


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
    # Loopback unless told otherwise; any other address needs API_KEYS (checks.py).
    host: str = "127.0.0.1"
    allow_anonymous: bool = False
    # Beyond loopback, only the simulated model is a forgotten key unless this says so.
    allow_fake_model: bool = False
    redis_url: str | None = None
    redis_prefix: str = "llmworker"
    embedded_redis_dir: Path = Path(".llmworker/redis")
    # "key" or "tenant:key", comma-separated (auth.py); admin keys see every tenant.
    api_keys: str = ""
    admin_keys: str = ""
    # The tenant QStash deliveries belong to.
    qstash_tenant: str = "default"
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
    # One line per HTTP request (method, path, status, ms, task id); probes at DEBUG.
    access_log: bool = True
    # A connection that sends nothing for this long while its request is incomplete
    # (or before its first one) is closed; requests carry at most this many headers of
    # at most this many bytes in all (protocol.py).
    http_idle_timeout_s: float = Field(20.0, gt=0, le=3600)
    http_max_headers: int = Field(100, ge=16, le=10000)
    http_max_header_bytes: int = Field(32768, ge=4096, le=1048576)
    # GET /metrics (Prometheus): counted in every process; with keys configured it takes
    # an admin key unless METRICS_PUBLIC (for a scraper on a private network).
    metrics_enabled: bool = True
    metrics_public: bool = False
    # Where `serve --workers N` processes share their counts (serve sets a temporary one).
    metrics_dir: Path | None = None
    # Traces to this OTLP/HTTP endpoint (observe/tracing.py); the exporter also reads the
    # other standard OTEL_EXPORTER_OTLP_* variables (headers, timeout).
    otel_exporter_otlp_endpoint: str | None = None

    tiers: str = "paid,free"
    default_tier: str = "free"
    default_model: str | None = None
    lease_ttl_s: float = Field(30.0, gt=0.5, le=3600)
    max_attempts: int = Field(3, ge=1, le=100)
    result_ttl_s: int = Field(86400, ge=1)
    # A run's token and progress events: written while somebody follows the task
    # ("followed"; a reader who comes later gets the text so far at once), or always.
    token_events: Literal["followed", "always"] = "followed"
    # A batch of tokens goes out 5 tokens or this long after its first token.
    token_flush_ms: float = Field(20.0, ge=1, le=1000)
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
    # Providers as they behave (providers/adaptive.py, lua/claim.lua): each model's cap
    # adapts between MIN_<MODEL> and MAX_* to the provider's 429s, and, for the providers
    # listed in ADAPT_TO_LATENCY, to its time to first token.
    adaptive_caps: bool = True
    adapt_to_latency: str = "deepseek"
    # A circuit opened by a refused key or an exhausted quota stays open this long unless
    # the provider says when it resets; then one probe call may close it.
    circuit_open_s: float = Field(60.0, gt=0, le=86400)
    # A task waiting this long for its first model may run on the next one with room.
    spill_after_s: float | None = Field(None, gt=0)
    # The window RPM_* and TPM_* count over (a minute; shorter only to test).
    rate_window_s: float = Field(60.0, gt=0, le=3600)

    # Money (usage.py, quotas.py, ledger.py): quota days and months are this zone's, and
    # the ledger of finished attempts and its daily totals are kept this many days.
    quota_timezone: str = "UTC"
    ledger_retention_days: int = Field(30, ge=1, le=3660)

    # Filled from the pattern families above by load_settings().
    providers: dict[str, Provider] = Field(default_factory=dict)
    models: dict[str, ModelAlias] = Field(default_factory=dict)
    model_limits: dict[str, dict[str, int]] = Field(default_factory=dict)
    model_total_limits: dict[str, int] = Field(default_factory=dict)
    user_limits: dict[str, int] = Field(default_factory=dict)
    queue_caps: dict[str, int] = Field(default_factory=dict)
    tier_weights: dict[str, int] = Field(default_factory=dict)
    rates: Rates = Field(default_factory=Rates)
    # tier -> limit name (settings/quotas.py) -> limit per user
    quotas: dict[str, dict[str, float]] = Field(default_factory=dict)

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
        "otel_exporter_otlp_endpoint",
        "spill_after_s",
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

    def model_ceiling(self, model: str) -> int:
        """The most calls of ``model`` in flight over all tiers: MAX_<MODEL>, or the sum
        of its tiers' limits (the adaptive cap's top)."""
        total = sum(self.model_limits.get(model, {}).values())
        cap = self.model_total_limits.get(model)
        return total if cap is None else min(cap, total)

    @property
    def latency_providers(self) -> set[str]:
        return {p.strip() for p in self.adapt_to_latency.split(",") if p.strip()}

    def redacted(self) -> dict[str, Any]:
        """Settings fit for a log line: secrets replaced by whether they are set."""
        secret = {"api_keys", "admin_keys", "callback_secret", "qstash_token"}
        data = self.model_dump(exclude={"providers", "models", "rates", *secret})
        for key in ("qstash_current_signing_key", "qstash_next_signing_key"):
            data[key] = bool(data[key])
        for key in ("api_keys", "admin_keys"):
            data[key] = len([k for k in getattr(self, key).split(",") if k.strip()])
        data["models"] = {a: f"{m.provider}/{m.model}" for a, m in self.models.items()}
        return data
