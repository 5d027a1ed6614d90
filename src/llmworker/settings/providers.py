"""Providers and model aliases: which OpenAI-compatible endpoints a deployment can call,
and what each ``model`` a task names stands for.

- ``<PROVIDER>_BASE_URL`` / ``<PROVIDER>_API_KEY``: a provider endpoint (a built-in one's
  key enables it; any other ``_BASE_URL`` declares a new one, which may need no key)
- ``MODEL_<ALIAS>``: a new alias, ``<provider>/<model name>``
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def env_token(name: str) -> str:
    return name.upper().replace("-", "_").replace(".", "_")


def read_providers(env: dict[str, str], problems: list[str]) -> dict[str, Provider]:
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


def read_models(
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
