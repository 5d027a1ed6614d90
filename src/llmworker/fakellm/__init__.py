"""``llmworker fake-llm``: an OpenAI-compatible provider for development, tests and
benchmarks, a real HTTP server (``server.py``) that behaves as real providers do
(``shapes.py``): a concurrency capacity with 429s above it, per-minute request and token
windows with OpenAI's headers, latency that grows with load, a quota that runs out,
outages."""

from __future__ import annotations

from llmworker.fakellm.server import FakeConfig, FakeLLM, json_response, run_fake_llm

__all__ = ["FakeConfig", "FakeLLM", "json_response", "run_fake_llm"]
