"""The provider layer: how a task's model is called.

- ``pool.py``    :class:`Providers`, one connection pool per provider for the process
- ``client.py``  :class:`LLMClient` (``ctx.llm``): chat completions with retries
- ``direct.py``  llmworker's own streaming client on aiohttp (``PROVIDER_CLIENT=direct``)
- ``sdk.py``     the official ``openai`` SDK (``PROVIDER_CLIENT=openai``)
- ``fake.py``    the in-process ``fake`` model
- ``stream.py``  streamed chunks folded into a :class:`ChatResult`
- ``errors.py``  every provider failure translated once into a ``ProviderError``
- ``adaptive.py`` each call's outcome fed to its model's adaptive cap; outages noticed
"""

from __future__ import annotations

from llmworker.providers.client import CallReport, LLMClient
from llmworker.providers.errors import retry_after_s
from llmworker.providers.pool import Providers
from llmworker.providers.stream import ChatResult, Choice

__all__ = ["CallReport", "ChatResult", "Choice", "LLMClient", "Providers", "retry_after_s"]
