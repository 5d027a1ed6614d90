"""One replica: the Redis connection and every part of the pipeline, started and
stopped together. The HTTP app (api.py) holds one; tests build one directly."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import uuid
from typing import Any

import structlog
from redis.exceptions import RedisError

from llmworker import __version__
from llmworker.admission import Admitter
from llmworker.connection import connect, wait_for_redis
from llmworker.dispatcher import Dispatcher
from llmworker.executor import Executor
from llmworker.handlers import Registry, import_task_modules, registry
from llmworker.hub import EventHub
from llmworker.keys import Keys
from llmworker.ledger import Ledger
from llmworker.notify import Notifier
from llmworker.observe import tracing
from llmworker.observe.health import ProviderHealth
from llmworker.observe.metrics import Metrics, NoMetrics
from llmworker.observe.snapshot import Observer, Snapshot, failures_view
from llmworker.providers import CallReport, Providers
from llmworker.providers.adaptive import Adapter
from llmworker.queue import Queue
from llmworker.quotas import Calendar, Quotas
from llmworker.record import iso_ms
from llmworker.settings import Settings, is_loopback

log = structlog.get_logger("llmworker.worker")


class Worker:
    def __init__(
        self,
        settings: Settings,
        *,
        tasks: Registry | None = None,
        dispatch: bool = True,
    ) -> None:
        if settings.redis_url is None:
            raise ValueError("Worker needs settings.redis_url (serve starts the embedded Redis)")
        self.settings = settings
        self.registry = tasks or registry
        self.dispatch = dispatch
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.keys = Keys(settings.redis_prefix)
        self.redis = connect(settings.redis_url)
        self.queue = Queue(self.redis, self.keys, settings.redis_timeout_s, Calendar.of(settings))
        self.metrics = Metrics() if settings.metrics_enabled else NoMetrics()
        self.ledger = Ledger(self.redis, self.keys, self.queue.calendar)
        self.quotas = Quotas(
            self.redis, self.keys, self.queue.scripts, settings, self.queue.calendar
        )
        self.observer = Observer(settings, self.queue.scripts)
        self.health = ProviderHealth(self.queue.scripts)
        self.admitter = Admitter(settings, self.queue, self.registry, self.metrics)
        # A task admitted here may be claimable here: look now, not after the Pub/Sub hop.
        self.admitter.on_admitted = lambda: self.dispatcher.wake()
        self.providers = Providers(settings)
        self.providers.observe = self._provider_call
        self.providers.on_limit = self._limit_used_up
        self.executor = Executor(
            settings,
            self.queue,
            self.registry,
            self.providers,
            self.admitter.submit_json,
            self.metrics,
        )
        self.dispatcher = Dispatcher(
            settings, self.redis, self.keys, self.queue, self.executor, self.replica_id
        )
        self.notifier = Notifier(settings, self.queue, self.metrics)
        self.hub = EventHub(
            settings.redis_url or "",
            self.queue.scripts,
            self.keys,
            self.replica_id,
            settings.redis_timeout_s,
        )
        self.adapter = Adapter(settings, self.queue)
        # Holds being recorded (a provider said a limit is used up).
        self._holding: set[asyncio.Future[None]] = set()
        self.executor.on_callback = self.notifier.wake
        self.started = False

    async def start(self) -> None:
        import_task_modules(self.settings.task_modules)
        if not tracing.active():
            tracing.setup(self.settings.otel_exporter_otlp_endpoint)
        await wait_for_redis(
            self.redis, self.settings.redis_url or "", self.settings.redis_connect_timeout_s
        )
        await self.queue.scripts.load()
        if self.dispatch:
            self.dispatcher.start()
            self.notifier.start()
            self.adapter.start()
        self.health.start()
        self.metrics.share(self.settings.metrics_dir)
        self.started = True
        log.info(
            "worker_started",
            version=__version__,
            replica=self.replica_id,
            models=self.settings.available_models,
            kinds=self.registry.names,
        )
        if not self.settings.real_models_available:
            log.warning(
                "only_fake_model",
                hint="no provider key is set (DEEPSEEK_API_KEY, GEMINI_API_KEY, ZHIPUAI_API_KEY, "
                "OPENAI_API_KEY): only the simulated 'fake' model runs",
            )
        self._warn_about_edges()

    def _warn_about_edges(self) -> None:
        s = self.settings
        if s.allow_anonymous and not s.api_keys.strip() and not s.admin_keys.strip():
            log.warning(
                "anonymous_access",
                host=s.host,
                hint="ALLOW_ANONYMOUS=true: anyone who reaches this worker may submit tasks "
                "and read every task; set API_KEYS",
            )
        keys = bool(s.api_keys.strip() or s.admin_keys.strip())
        if keys and is_loopback(s.host):
            log.warning(
                "loopback_only",
                host=s.host,
                hint="API_KEYS is set but HOST is loopback: only this machine can connect; "
                "set HOST=0.0.0.0 to serve others",
            )
        if s.qstash_skip_verify:
            log.warning(
                "qstash_unverified",
                hint="QSTASH_SKIP_VERIFY=true: /v1/qstash accepts unsigned deliveries "
                "(development only)",
            )
        elif s.qstash_keys and not s.public_url:
            log.warning(
                "qstash_without_public_url",
                hint="PUBLIC_URL is not set (development): signatures are checked against "
                "each request's own URL, which differs behind a proxy and trusts its Host",
            )

    async def stop(self) -> None:
        if self.started and self.dispatch:
            await self.dispatcher.stop(self.settings.shutdown_grace_s)
            await self.notifier.stop()
            await self.adapter.stop()
            # Out of the replica count at once, not when its heartbeat lapses.
            try:
                await self.queue.leave(self.replica_id)
            except (RedisError, OSError) as exc:
                log.warning("replica_not_removed", error=str(exc))
        self.started = False
        await self.hub.stop()
        await self.health.stop()
        await self.metrics.unshare()
        await self.providers.aclose()
        await self.redis.aclose()
        log.info("worker_stopped", replica=self.replica_id)

    async def ready(self) -> bool:
        if not self.started or self.dispatcher.draining:
            return False
        try:
            return bool(await self.redis.ping())  # type: ignore[misc]
        except (RedisError, OSError):
            return False

    def _provider_call(self, call: CallReport) -> None:
        self.metrics.provider_call(call)
        self.adapter.note(call)
        self.health.note(call.alias, call.outcome, call.duration_s, call.ttft_s)
        tracing.provider_call(call)

    def _limit_used_up(self, model: str, seconds: float) -> None:
        holding = asyncio.ensure_future(self._hold(model, seconds))
        self._holding.add(holding)
        holding.add_done_callback(self._holding.discard)

    async def _hold(self, model: str, seconds: float) -> None:
        """Hold the model until its provider's limit resets; every replica looks again then."""
        try:
            held_ms, longer = await self.queue.hold(model, max(1, int(seconds * 1000)))
        except (RedisError, OSError) as exc:
            log.warning("hold_not_recorded", model=model, error=str(exc))
            return
        if longer:
            log.info(
                "model_held", model=model, wait_s=round(held_ms / 1000, 3), reason="limit_used_up"
            )
            self.dispatcher.held(held_ms / 1000)

    async def snapshot(self, detail: bool = False) -> Snapshot:
        return await self.observer.read(detail)

    async def failures(
        self, status: str = "", model: str = "", error: str = "", tenant: str = "", limit: int = 50
    ) -> dict[str, Any]:
        """The latest tasks that failed or were cancelled, newest first, filtered."""
        raw = await self.queue.scripts.call("failures", status, model, error, tenant, limit)
        return failures_view(raw)

    async def stats(self) -> dict[str, Any]:
        """What ``GET /v1/stats``, the dashboard and ``llmworker top`` show."""
        snap = await self.observer.read(detail=True)
        cost_today = await self.ledger.today()
        s = self.settings
        queues: dict[str, Any] = {}
        guards: dict[str, Any] = {}
        for tier in s.tier_names:
            queues[tier] = {"waiting": snap.waiting_by_tier[tier], "cap": s.queue_caps[tier]}
            queues[tier]["models"] = {
                lane.model: lane.waiting
                for lane in snap.lanes
                if lane.tier == tier and lane.waiting
            }
        for lane in snap.lanes:
            entry = guards.setdefault(lane.model, {"tiers": {}})
            entry["tiers"][lane.tier] = {
                "in_use": lane.running,
                "limit": lane.limit,
                "cap": lane.cap,
            }
            total = snap.guards.get(f"model:{lane.model}")
            if total is not None:
                entry["total"] = {"in_use": total[0], "limit": total[1]}
        return {
            "now": iso_ms(snap.now_ms),
            "lanes": [dataclasses.asdict(lane) for lane in snap.lanes],
            **snap.detail,
            "queues": queues,
            "running": snap.running,
            "callbacks_waiting": snap.callbacks,
            "guards": guards,
            "user_limits": {t: s.user_limits[t] for t in s.tier_names},
            "replicas_alive": snap.replicas,
            "cost_today": cost_today,
            "held": snap.held,
            "circuits": snap.circuits,
            "adaptive_caps": {
                model: {"cap": cap, "max": s.model_ceiling(model), "min": s.rates.floor(model)}
                for model, cap in snap.caps.items()
            },
            "replica": {
                "id": self.replica_id,
                "running": len(self.dispatcher.runs),
                "claimed_total": self.dispatcher.claimed_total,
                "draining": self.dispatcher.draining,
            },
        }
