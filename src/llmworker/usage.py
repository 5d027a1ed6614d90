"""What a task used and what it cost.

A provider reports usage in its own words (OpenAI's ``prompt_tokens_details``,
DeepSeek's ``prompt_cache_hit_tokens`` ...): :func:`tokens_of` reads them into four
types, :class:`Pricing` prices them in USD at the price in force when the run started:

- ``PRICE_<MODEL>=<input>,<output>[,<cached input>]`` (USD per million tokens) for any
  alias, first;
- else the ``genai-prices`` package for the built-in providers' models (DeepSeek's
  off-peak discount included: the price depends on the time);
- else null: a self-hosted or unknown model costs what its operator says it costs.

A run cut short (cancelled, failed mid-stream) has no reported usage: what streamed is
estimated (:func:`estimated`), and the cost says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any

from llmworker.settings import Settings

# Providers whose models genai-prices knows, by its ids.
PRICED_PROVIDERS = {"deepseek": "deepseek", "gemini": "google", "openai": "openai"}


@dataclass(frozen=True)
class Tokens:
    """Tokens by type. ``input`` counts every input token, ``cached_input`` the part of
    them read from the provider's cache; ``output`` counts every output token,
    ``reasoning`` the part of them spent thinking."""

    input: int = 0
    cached_input: int = 0
    output: int = 0
    reasoning: int = 0

    @property
    def total(self) -> int:
        return self.input + self.output


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def tokens_of(usage: dict[str, Any]) -> Tokens:
    prompt = usage.get("prompt_tokens_details") or {}
    completion = usage.get("completion_tokens_details") or {}
    cached = _int(prompt.get("cached_tokens") if isinstance(prompt, dict) else 0) or _int(
        usage.get("prompt_cache_hit_tokens")
    )
    reasoning = _int(completion.get("reasoning_tokens") if isinstance(completion, dict) else 0)
    return Tokens(
        input=_int(usage.get("prompt_tokens")),
        cached_input=cached,
        output=_int(usage.get("completion_tokens")),
        reasoning=reasoning,
    )


# Characters from here on (CJK and beyond) are about a token each.
WIDE = 0x2E80


def wide_chars(text: str) -> int:
    return 0 if text.isascii() else sum(1 for ch in text if ord(ch) >= WIDE)


def token_estimate(chars: int, wide: int) -> int:
    """Tokens of a text from its length alone: about four characters each in Latin
    scripts, one per CJK character (erring high, as a reservation should)."""
    return wide + (chars - wide + 3) // 4


def estimate_tokens(text: str) -> int:
    return token_estimate(len(text), wide_chars(text))


def estimated(prompt_chars: int, prompt_wide: int, output_chars: int, output_wide: int) -> Tokens:
    """The tokens of calls cut short, from the characters of their prompts and of what
    streamed."""
    return Tokens(
        input=token_estimate(prompt_chars, prompt_wide),
        output=token_estimate(output_chars, output_wide),
    )


def run_tokens(usage: dict[str, Any], cut: Sequence[int]) -> tuple[Tokens, bool]:
    """A run's tokens: what its provider reported, and an estimate of its calls cut short
    after they streamed (``cut``: see :func:`estimated`); and whether any is estimated."""
    reported, extra = tokens_of(usage), estimated(*cut)
    tokens = Tokens(
        reported.input + extra.input,
        reported.cached_input,
        reported.output + extra.output,
        reported.reasoning,
    )
    return tokens, extra.total > 0


@dataclass(frozen=True)
class Cost:
    """A run's usage and its price; ``usd`` None when the model has no known price."""

    tokens: Tokens
    usd: float | None
    source: str | None
    estimated: bool = False

    def to_record(self) -> dict[str, Any]:
        return {
            "usd": self.usd,
            "source": self.source,
            "estimated": self.estimated,
            "tokens": asdict(self.tokens),
        }


# Nano-USD per USD: Redis counts money in whole nano-dollars (HINCRBY adds them exactly).
NANO = 1_000_000_000


class Pricing:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._genai = f"genai-prices {version('genai-prices')}"
        # (alias, minute) -> nano-USD per input and per output token
        self._units: dict[tuple[str, int], tuple[float, float]] = {}

    def unit_prices(self, alias: str, at: datetime | None = None) -> tuple[float, float]:
        """Nano-USD per input and per output token (uncached) at ``at``; (0, 0) for a model
        without a price. What admission reserves with: looked up once a minute per model
        (a price may change with the time of day)."""
        at = at or datetime.now(UTC)
        minute = int(at.timestamp()) // 60
        found = self._units.get((alias, minute))
        if found is None:
            if len(self._units) > 1000:
                self._units.clear()
            million = 1_000_000
            per_in = self._price(alias, Tokens(input=million), at)[0] or 0.0
            per_out = self._price(alias, Tokens(output=million), at)[0] or 0.0
            found = (per_in * NANO / million, per_out * NANO / million)
            self._units[(alias, minute)] = found
        return found

    def cost(
        self, alias: str, tokens: Tokens, at: datetime | None = None, estimate: bool = False
    ) -> Cost:
        usd, source = self._price(alias, tokens, at or datetime.now(UTC))
        return Cost(tokens, usd, source, estimate)

    def _price(self, alias: str, tokens: Tokens, at: datetime) -> tuple[float | None, str | None]:
        own = self.settings.rates.prices.get(alias)
        if own is not None:
            per_input, per_output, per_cached = own
            cached = min(tokens.cached_input, tokens.input)
            usd = (
                (tokens.input - cached) * per_input
                + cached * (per_cached if per_cached is not None else per_input)
                + tokens.output * per_output
            ) / 1_000_000
            return round(usd, 10), f"PRICE_{self.settings.models[alias].env_name}"
        model = self.settings.models.get(alias)
        provider = PRICED_PROVIDERS.get(model.provider) if model else None
        if model is None or provider is None:
            return None, None
        from genai_prices import Usage, calc_price

        usage = Usage(
            input_tokens=tokens.input,
            cache_read_tokens=min(tokens.cached_input, tokens.input),
            output_tokens=tokens.output,
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found = calc_price(
                    usage, model.model, provider_id=provider, genai_request_timestamp=at
                )
        except LookupError:
            return None, None
        return round(float(found.total_price), 10), self._genai
