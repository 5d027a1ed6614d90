"""The one settings object, read from the environment and ``.env``.

Names follow the deployment guide's ``.env`` (``MAX_DS_CHAT_PAID``, ``QUEUE_MAX_FREE``,
``DEEPSEEK_API_KEY`` ...). Besides the declared fields (``fields.py``), families of
names are read by pattern, because their names carry data:

- ``MAX_<MODEL>_<TIER>``   slots per model alias and tier (``MAX_DS_CHAT_PAID=10``)
- ``MAX_<MODEL>``          slots per model alias over all tiers (optional)
- ``MAX_USER_<TIER>``      concurrent tasks per user of a tier
- ``QUEUE_MAX_<TIER>``     waiting tasks per tier before 429
- ``TIER_WEIGHT_<TIER>``   dispatch weight of a tier    (these five: ``limits.py``)
- ``RPM_<MODEL>[_<TIER>]``, ``TPM_<MODEL>[_<TIER>]``, ``MIN_<MODEL>``, ``CONTEXT_<MODEL>``
  and ``ROUTE_<KIND>_<TIER>``: what providers allow, and routes (``rates.py``)
- ``QUOTA_<TIER>_<TASKS|TOKENS|USD>_PER_<DAY|MONTH>``: what each user may use (``quotas.py``)
- ``MODEL_<ALIAS>``        a new alias: ``<provider>/<model name>``
- ``<PROVIDER>_BASE_URL`` / ``<PROVIDER>_API_KEY``: a provider endpoint (``providers.py``)

Every problem found is reported as one line of :class:`~llmworker.errors.ConfigError`,
all of them at once (``checks.py`` holds the checks that span several settings).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import DotEnvSettingsSource

from llmworker.errors import ConfigError
from llmworker.settings.checks import (
    check_access,
    check_edges,
    check_urls,
    is_loopback,
    redacted_url,
)
from llmworker.settings.fields import DYNAMIC_FIELDS, Settings
from llmworker.settings.limits import read_limits
from llmworker.settings.providers import (
    FAKE_PROVIDER,
    NAME_RE,
    ModelAlias,
    Provider,
    env_token,
    read_models,
    read_providers,
)
from llmworker.settings.quotas import read_quotas
from llmworker.settings.rates import Rates, read_rates

__all__ = [
    "FAKE_PROVIDER",
    "ModelAlias",
    "Provider",
    "Rates",
    "Settings",
    "env_token",
    "is_loopback",
    "load_settings",
    "read_environment",
    "redacted_url",
]


def read_environment(
    environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
) -> dict[str, str]:
    """The process environment over the ``.env`` file, keys in capitals."""
    merged: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        source = DotEnvSettingsSource(Settings, env_file=env_file)
        merged.update({k.upper(): v for k, v in source.env_vars.items() if v is not None})
    env = os.environ if environ is None else environ
    merged.update({k.upper(): v for k, v in env.items()})
    return merged


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
            problems.append(f"{field.upper()}{shown}: {_rule(err['type'], err['msg'])}")
        return Settings.model_validate({k: v for k, v in plain.items() if k not in bad})


# pydantic's words for a wrong value, as one says them of a setting.
_RULES = {
    "int_parsing": "is not a whole number",
    "int_from_float": "is not a whole number",
    "float_parsing": "is not a number",
    "bool_parsing": "must be true or false",
}


def _rule(kind: str, message: str) -> str:
    return _RULES.get(kind) or message.replace("Input should be", "must be")


def _check_fake_only(
    base: Settings,
    models: dict[str, ModelAlias],
    providers: dict[str, Provider],
    problems: list[str],
) -> None:
    """Serving others with only the simulated model is a forgotten provider key."""
    real = [a for a, m in models.items() if a != "fake" and providers[m.provider].available]
    if real or base.allow_fake_model or is_loopback(base.host):
        return
    if base.llmworker_env == "development":
        return
    problems.append(
        f"HOST={base.host} serves other machines but no provider key is set (DEEPSEEK_API_KEY, "
        "GEMINI_API_KEY, ZHIPUAI_API_KEY, OPENAI_API_KEY, or <PROVIDER>_BASE_URL): every "
        "task would get the simulated 'fake' model; set a key, or ALLOW_FAKE_MODEL=true"
    )


def _check_tiers(base: Settings, problems: list[str]) -> list[str]:
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
    return tiers


def _check_default_model(
    base: Settings,
    models: dict[str, ModelAlias],
    providers: dict[str, Provider],
    problems: list[str],
) -> None:
    name = base.default_model
    if name is None:
        return
    if name not in models:
        problems.append(
            f"DEFAULT_MODEL={name!r} is not a model alias ({', '.join(sorted(models))})"
        )
    elif not providers[models[name].provider].available:
        problems.append(f"DEFAULT_MODEL={name!r} needs {env_token(models[name].provider)}_API_KEY")


def _check_timezone(base: Settings, problems: list[str]) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(base.quota_timezone)
    except (ZoneInfoNotFoundError, ValueError):
        problems.append(
            f"QUOTA_TIMEZONE={base.quota_timezone!r} is not a time zone name "
            "(an IANA name such as UTC or Asia/Shanghai)"
        )


def load_settings(
    environ: Mapping[str, str] | None = None,
    env_file: str | Path | None = ".env",
    **overrides: Any,
) -> Settings:
    """Read and validate the settings; raise :class:`ConfigError` listing every problem.

    ``environ`` replaces ``os.environ`` (tests pass their own); ``overrides`` win over both.
    """
    env = read_environment(environ, env_file)
    problems: list[str] = []
    declared = set(Settings.model_fields)
    plain = {k.lower(): v for k, v in env.items() if k.lower() in declared}
    plain.update(overrides)
    for dynamic in DYNAMIC_FIELDS:
        plain.pop(dynamic, None)
    base = _validate_declared(plain, problems)
    tiers = _check_tiers(base, problems)
    providers = read_providers(env, problems)
    models = read_models(env, providers, problems)
    for alias in models:
        if not NAME_RE.match(alias):
            problems.append(
                f"model alias {alias!r} must be lower-case letters, digits, '-', '_' or '.'"
            )
    limits = read_limits(env, declared, tiers, models, problems)
    rates = read_rates(env, tiers, models, problems)
    quotas = read_quotas(env, declared, tiers, problems)
    _check_timezone(base, problems)
    _check_default_model(base, models, providers, problems)
    _check_fake_only(base, models, providers, problems)
    check_access(base, problems)
    check_urls(base, problems)
    check_edges(base, problems)
    if problems:
        raise ConfigError(problems)
    return base.model_copy(
        update={
            "providers": providers,
            "models": models,
            "rates": rates,
            "quotas": quotas,
            **limits,
        }
    )
