"""The deployment as Redis sees it, read in one round trip (``lua/snapshot.lua``): what
``/metrics`` reports as gauges, and what ``/v1/stats``, the dashboard and
``llmworker top`` show. Every replica reads the same numbers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from llmworker.auth import DEFAULT_TENANT, public_id, unscoped
from llmworker.observe.health import WINDOW_MIN, summarise
from llmworker.record import iso_ms
from llmworker.scripts import Scripts
from llmworker.settings import Settings

THROUGHPUT_MIN = 60
RUNNING_SHOWN = 50


def _pairs(flat: Any) -> dict[str, Any]:
    # cjson writes an empty Lua table as {}: no pairs.
    if not isinstance(flat, list):
        return {}
    return {str(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


@dataclass
class Lane:
    tier: str
    model: str
    waiting: int
    running: int
    limit: int
    oldest_wait_s: float | None
    # The limit as the adaptive cap leaves it (the model's cap over all tiers, if lower).
    cap: int = 0


@dataclass
class Snapshot:
    now_ms: int
    lanes: list[Lane]
    waiting_by_tier: dict[str, int]
    # guard name ("model:<alias>:<tier>", "model:<alias>") -> (used, limit)
    guards: dict[str, tuple[int, int]]
    running: int
    replicas: int
    callbacks: int
    # model -> seconds its provider still asked to wait (pause.lua)
    held: dict[str, float] = field(default_factory=dict)
    # model -> its circuit: state (open, half_open), left_s, code, since (ISO), probing
    circuits: dict[str, dict[str, Any]] = field(default_factory=dict)
    # model -> its adaptive cap over all tiers, where one is in force
    caps: dict[str, int] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return sorted({lane.model for lane in self.lanes})


class Observer:
    """Reads snapshots for one deployment's settings."""

    def __init__(self, settings: Settings, scripts: Scripts) -> None:
        self.settings = settings
        self.scripts = scripts
        self.tiers = settings.tier_names
        weights = settings.tier_weights
        self.ranked = sorted(self.tiers, key=lambda t: -weights.get(t, 1))
        self.models = sorted(settings.available_models)
        self.totals = [m for m in self.models if m in settings.model_total_limits]

    async def read(self, detail: bool = False) -> Snapshot:
        raw = await self.scripts.call(
            "snapshot",
            "1" if detail else "0",
            " ".join(self.tiers),
            " ".join(self.models),
            " ".join(self.totals),
            WINDOW_MIN,
            THROUGHPUT_MIN,
            RUNNING_SHOWN,
        )
        data = orjson.loads(raw)
        now = int(data["now"])
        depth = {k: int(v) for k, v in _pairs(data["depth"]).items()}
        oldest = {k: int(v) for k, v in _pairs(data["oldest"]).items()}
        used = {k: int(v) for k, v in _pairs(data["guards"]).items()}
        s = self.settings
        circuits: dict[str, dict[str, Any]] = {}
        caps: dict[str, int] = {}
        for state in data.get("states") or []:
            model = str(state["model"])
            if state.get("cap") is not None and s.adaptive_caps:
                caps[model] = int(state["cap"])
            if circuit := state.get("circuit"):
                circuits[model] = {
                    "state": circuit["state"],
                    "left_s": int(circuit["left_ms"]) / 1000,
                    "code": circuit["code"],
                    "since": iso_ms(int(circuit["since"])),
                    "probing": bool(circuit["probing"]),
                }
        lanes = []
        guards: dict[str, tuple[int, int]] = {}
        for tier in self.ranked:
            for model in self.models:
                limit = s.model_limit(model, tier)
                running = used.get(f"m:{tier}:{model}", 0)
                created = oldest.get(f"{tier}|{model}")
                lanes.append(
                    Lane(
                        tier=tier,
                        model=model,
                        waiting=max(0, depth.get(f"{tier}|{model}", 0)),
                        running=running,
                        limit=limit,
                        oldest_wait_s=None if created is None else max(0, now - created) / 1000,
                        cap=min(limit, caps.get(model, limit)),
                    )
                )
                guards[f"model:{model}:{tier}"] = (running, limit)
        for model in self.totals:
            guards[f"model:{model}"] = (used.get(f"t:{model}", 0), s.model_total_limits[model])
        snap = Snapshot(
            now_ms=now,
            lanes=lanes,
            waiting_by_tier={t: max(0, depth.get(t, 0)) for t in self.tiers},
            guards=guards,
            running=int(data["running"]),
            replicas=int(data["replicas"]),
            callbacks=int(data["callbacks"]),
            held={k: int(v) / 1000 for k, v in _pairs(data.get("holds")).items()},
            circuits=circuits,
            caps=caps,
        )
        if detail:
            snap.detail = _detail(data, now)
        return snap


def _detail(data: dict[str, Any], now: int) -> dict[str, Any]:
    health = {k: int(v) for k, v in _pairs(data.get("health")).items()}
    tp = data.get("throughput") or {}
    minutes = tp.get("minutes") or []
    tasks = []
    for row in data.get("tasks") or []:
        ref, kind, tier, model, user, started, attempts, tenant = row
        tenant = tenant or DEFAULT_TENANT
        tasks.append(
            {
                "id": public_id(ref),
                "tenant": tenant,
                "kind": kind,
                "tier": tier,
                "model": model,
                "user": unscoped(tenant, user or ""),
                "started_at": iso_ms(started),
                "attempts": attempts,
                "run_s": round(max(0, now - int(started)) / 1000, 1),
            }
        )
    return {
        "throughput": {
            "start": iso_ms(tp.get("start", now)),
            "minute_s": 60,
            "succeeded": [m[0] for m in minutes],
            "failed": [m[1] for m in minutes],
            "cancelled": [m[2] for m in minutes],
        },
        "providers": summarise(health),
        "running_tasks": tasks,
    }


def failures_view(raw: bytes | str) -> dict[str, Any]:
    """``lua/failures.lua``'s answer as ``GET /v1/failures`` gives it."""
    data = orjson.loads(raw)
    out = []
    for row in data.get("tasks") or []:
        ref, tenant, kind, tier, model, user, status, error, finished, attempts, retried = row
        err = None
        if error:
            try:
                parsed = orjson.loads(error)
            except orjson.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict):
                err = {"code": parsed.get("code"), "message": parsed.get("message")}
        out.append(
            {
                "id": public_id(ref),
                "tenant": tenant,
                "kind": kind,
                "tier": tier,
                "model": model,
                "user": unscoped(tenant, user),
                "status": status,
                "error": err,
                "finished_at": iso_ms(finished),
                "attempts": attempts,
                "retried_as": retried or None,
            }
        )
    facets = data.get("facets") or {}
    return {
        "failures": out,
        "facets": {k: list(facets.get(k) or []) for k in ("status", "model", "error")},
    }
