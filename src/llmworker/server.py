"""``llmworker serve``: settings, the port, Redis (embedded when needed), then uvicorn.

The order is the point: everything that can refuse to start is tried before the replica
joins the queue. The port is bound first (a replica that cannot serve never claims a
task), then Redis must answer, and only then does the app start its dispatcher.

SIGTERM and SIGINT (Ctrl+C, which a terminal sends to the whole foreground process
group) both drain: no new claims, running tasks get ``SHUTDOWN_GRACE_S`` to finish and
record their outcomes, the rest go back to the queue; then the embedded Redis is
released last (embedded.py), and the process exits 0 without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
import uvicorn
from uvicorn.supervisors import ChangeReload, Multiprocess

from llmworker.api import create_app
from llmworker.connection import check_redis
from llmworker.embedded import EmbeddedRedis
from llmworker.errors import StartupError
from llmworker.handlers import import_task_modules
from llmworker.logs import configure_logging
from llmworker.protocol import BoundedHttpProtocol
from llmworker.settings import Settings, load_settings, redacted_url
from llmworker.worker import Worker

log = structlog.get_logger("llmworker.server")

# Open connections (event streams) get this long to close after SIGTERM before the
# lifespan shutdown starts draining the running tasks (SHUTDOWN_GRACE_S).
HTTP_GRACE_S = 5


def raise_open_files_limit() -> None:
    """Each running task holds a provider connection: lift the soft limit on open files
    (often 1024) to the hard limit, as servers do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or :class:`StartupError` naming what to change."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"Port {port} on {host} is in use: stop what listens there, or set PORT "
                "(or --port) to another port."
            ) from None
        raise StartupError(
            f"Cannot listen on {host}:{port} (HOST, PORT): {exc.strerror}."
        ) from None
    sock.set_inheritable(True)
    return sock


def serve(*, workers: int = 1, reload: bool = False, **overrides: Any) -> int:
    settings = load_settings(**overrides)
    configure_logging(settings)
    BoundedHttpProtocol.configure(settings)
    # Before the server starts, so a broken module is one line, not a traceback.
    import_task_modules(settings.task_modules)
    raise_open_files_limit()
    sock = bind(settings.host, settings.port)
    embedded = None
    # uvicorn re-raises SIGTERM / SIGINT once it has shut down; with the default handlers
    # that would end the process there (SIGINT with a KeyboardInterrupt traceback) and
    # skip releasing the embedded Redis below.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    try:
        if settings.redis_url is None:
            embedded = EmbeddedRedis(settings.embedded_redis_dir)
            url = embedded.start()
            settings = settings.model_copy(update={"redis_url": url})
            # Worker processes (--workers, --reload) read their settings from the environment.
            os.environ["REDIS_URL"] = url
        asyncio.run(check_redis(settings.redis_url or "", settings.redis_connect_timeout_s))
        log.info(
            "serving",
            host=settings.host,
            port=settings.port,
            workers=workers,
            redis=redacted_url(settings.redis_url or "-"),
        )
        _run(settings, sock, workers, reload)
    finally:
        sock.close()
        if embedded is not None:
            embedded.stop()
    return 0


def _run(settings: Settings, sock: socket.socket, workers: int, reload: bool) -> None:
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "http": BoundedHttpProtocol,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": HTTP_GRACE_S,
        "proxy_headers": True,
        "forwarded_allow_ips": "*",
    }
    if workers <= 1 and not reload:
        app = create_app(settings)
        server = Server(uvicorn.Config(app, **common), app.state.worker)
        server.run(sockets=[sock])
        if not server.started:
            raise StartupError("The server did not start; see the lines above.")
        return
    # Worker processes and the reloader build the app in each process from the environment.
    os.environ["PORT"] = str(settings.port)
    config = uvicorn.Config(
        "llmworker.api:app_from_env",
        factory=True,
        workers=workers,
        reload=reload,
        # Reload on changes to llmworker's own source (and the task modules in the
        # working folder), not on everything under it (.venv).
        reload_dirs=[str(Path(__file__).parent), os.getcwd()] if reload else None,
        reload_excludes=[".venv/*", ".llmworker/*"] if reload else None,
        **common,
    )
    if reload:
        ChangeReload(config, target=uvicorn.Server(config).run, sockets=[sock]).run()
        return
    with shared_metrics(settings.metrics_dir):
        Multiprocess(config, sockets=[sock]).run()


@contextlib.contextmanager
def shared_metrics(given: Path | None) -> Iterator[None]:
    """Worker processes write their metrics to files in one folder, and whichever
    process a scrape reaches reads them all (observe/metrics.py). The folder is
    ``METRICS_DIR`` if set (emptied first: files of an earlier run would count twice),
    else a temporary one removed at the end."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        for stale in given.glob("llmworker-*.json"):
            stale.unlink()
        # The worker processes read their settings from the environment.
        os.environ["METRICS_DIR"] = str(given)
        yield
        return
    folder = Path(tempfile.mkdtemp(prefix="llmworker-metrics-"))
    os.environ["METRICS_DIR"] = str(folder)
    try:
        yield
    finally:
        os.environ.pop("METRICS_DIR", None)
        shutil.rmtree(folder, ignore_errors=True)


class Server(uvicorn.Server):
    """uvicorn's server, with a repeated Ctrl+C that cuts the drain short (running tasks go
    back to the queue at once) instead of uvicorn's force-quit, which would skip the
    lifespan's shutdown, and with it the drain, altogether."""

    def __init__(self, config: uvicorn.Config, worker: Worker) -> None:
        super().__init__(config)
        self.worker = worker

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: it may run while this very thread is inside a log call (and
        # holds its lock), so whatever it does beyond flags runs from the event loop.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if sig == signal.SIGINT and self.should_exit:
            self._captured_signals.append(sig)
            if loop is not None:
                loop.call_soon_threadsafe(self._hand_back_now)
            return
        if sig == signal.SIGINT and loop is not None:
            loop.call_soon_threadsafe(self._say_stopping)
        super().handle_exit(sig, frame)

    def _say_stopping(self) -> None:
        if self.worker.dispatcher.runs:
            log.info(
                "stopping",
                running=len(self.worker.dispatcher.runs),
                grace_s=self.worker.settings.shutdown_grace_s,
                hint="running tasks may finish; Ctrl+C again hands them back to the queue now",
            )

    def _hand_back_now(self) -> None:
        log.info("handing_back_now", running=len(self.worker.dispatcher.runs))
        self.worker.dispatcher.cut_short()


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)
