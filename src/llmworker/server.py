"""``llmworker serve``: settings, the embedded Redis when needed, and uvicorn."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from pathlib import Path
from typing import Any

import structlog
import uvicorn

from llmworker.api import create_app
from llmworker.embedded import EmbeddedRedis
from llmworker.handlers import import_task_modules
from llmworker.logs import configure_logging
from llmworker.settings import load_settings

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


def serve(*, workers: int = 1, reload: bool = False, **overrides: Any) -> int:
    settings = load_settings(**overrides)
    configure_logging(settings)
    # Before the server starts, so a broken module is one line, not a traceback.
    import_task_modules(settings.task_modules)
    raise_open_files_limit()
    embedded = None
    if settings.redis_url is None:
        embedded = EmbeddedRedis(settings.embedded_redis_dir)
        url = embedded.start()
        settings = settings.model_copy(update={"redis_url": url})
        # Worker processes (--workers, --reload) read their settings from the environment.
        os.environ["REDIS_URL"] = url
    log.info(
        "serving",
        host=settings.host,
        port=settings.port,
        workers=workers,
        redis=_where(settings.redis_url),
    )
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": HTTP_GRACE_S,
        "proxy_headers": True,
        "forwarded_allow_ips": "*",
    }
    # uvicorn re-raises SIGTERM once it has shut down; with the default handler that
    # would end the process here and skip stopping the embedded Redis below.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        if workers > 1 or reload:
            os.environ["PORT"] = str(settings.port)
            # Reload on changes to llmworker's own source (and the task modules in the
            # working folder), not on everything under it (.venv).
            reload_dirs = [str(Path(__file__).parent), os.getcwd()] if reload else None
            uvicorn.run(
                "llmworker.api:app_from_env",
                factory=True,
                workers=workers,
                reload=reload,
                reload_dirs=reload_dirs,
                reload_excludes=[".venv/*", ".llmworker/*"] if reload else None,
                **common,
            )
        else:
            config = uvicorn.Config(create_app(settings), **common)
            uvicorn.Server(config).run()
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _where(url: str | None) -> str:
    """A Redis URL without its password, for the log."""
    if not url:
        return "-"
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"
