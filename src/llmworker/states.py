"""A task's states (DESIGN.md): ``queued -> running -> succeeded | failed | cancelled``.
Here, apart from the record, so that the client imports nothing heavier."""

from __future__ import annotations

from typing import Literal

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
