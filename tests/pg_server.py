"""A real PostgreSQL with pgvector on 127.0.0.1 at a free port, for the PostgreSQL base's tests.

Both come from PyPI in the `pgserver` wheel (a test extra: Debian bookworm has no pgvector
package); this starts its binaries itself, by PID, in a temporary folder: `initdb`, then
`postgres` (no pg_ctl, no daemon). PostgreSQL refuses to run as root, so as root (CI) the
server runs as a system user made for it (`llmgate-pg`). Without pgserver the tests skip
on a developer's machine, saying how to install it; in CI (LLMGATE_CI=1) they fail.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.redis_server import free_port

INSTALL = ("pgserver is not installed (it ships PostgreSQL with pgvector: "
           ".venv/bin/pip install -e '.[test]', which scripts/test does)")
USER = "llmgate-pg"


def _binaries() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pgserver")  # its files only (importing it does more)
    if spec is None or spec.origin is None:
        if os.environ.get("LLMGATE_CI"):
            pytest.fail(INSTALL)
        pytest.skip(INSTALL)
    return Path(spec.origin).parent / "pginstall" / "bin"


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) of the user the server runs as when this is root; None otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        USER], check=True, capture_output=True)
        entry = pwd.getpwnam(USER)
    return entry.pw_uid, entry.pw_gid


def _reachable(path: Path) -> bool:
    """Whether another user may run what is in `path` (every folder above it searchable)."""
    return all(parent.stat().st_mode & 0o001 for parent in path.parents)


def _for_others(binaries: Path) -> Path:
    """The binaries where the server's own user can run them: as they are, or (a checkout
    under /root, say) a copy of the install in a temporary folder, made once a run
    (PostgreSQL finds its libraries and extensions beside its binaries)."""
    if _reachable(binaries):
        return binaries
    install = binaries.parent  # site-packages/pgserver/pginstall
    copy = Path(tempfile.gettempdir()) / f"llmgate-pginstall-{os.getpid()}"
    if not copy.exists():
        staging = Path(tempfile.mkdtemp(prefix="llmgate-pginstall-"))
        for part in ("bin", "lib", "share"):
            shutil.copytree(install / part, staging / "pgserver" / "pginstall" / part,
                            symlinks=True)
        # the binaries' RPATH: $ORIGIN/../../../pgserver.libs (the wheel's own libpq)
        shutil.copytree(install.parent.parent / "pgserver.libs", staging / "pgserver.libs",
                        symlinks=True)
        staging.chmod(0o755)
        staging.rename(copy)
        atexit.register(shutil.rmtree, copy, True)
    return copy / "pgserver" / "pginstall" / "bin"


class PgServer:
    """One PostgreSQL server; `stop()` and `start()` again on the same port and data
    (the database going down and coming back)."""

    def __init__(self) -> None:
        self.owner = _run_as()
        self.bin = _binaries() if self.owner is None else _for_others(_binaries())
        self.dir = Path(tempfile.mkdtemp(prefix="llmgate-pg-"))
        self.dir.chmod(0o700)
        if self.owner is not None:
            os.chown(self.dir, *self.owner)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.dsn = f"postgresql://postgres:pw-not-shown@127.0.0.1:{self.port}/postgres"
        self._subprocess(
            [self.bin / "initdb", "-D", self.dir / "data", "-U", "postgres", "--auth=trust",
             "-E", "utf8", "--no-sync"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    def _subprocess(self, argv: list, **kwargs) -> subprocess.CompletedProcess:
        if self.owner is not None:
            kwargs.update(user=self.owner[0], group=self.owner[1], extra_groups=[])
        return subprocess.run([str(a) for a in argv], **kwargs)

    def start(self) -> None:
        argv = [self.bin / "postgres", "-D", self.dir / "data", "-p", str(self.port),
                "-k", self.dir, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                "-c", "max_connections=100", "-c", "shared_buffers=128MB"]
        kwargs: dict = {}
        if self.owner is not None:
            kwargs.update(user=self.owner[0], group=self.owner[1], extra_groups=[])
        log = open(self.dir / "log", "ab")  # noqa: SIM115 (the server's, closed below)
        self.proc = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=log, **kwargs)
        log.close()
        deadline = time.monotonic() + 20
        while not self._ready():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"postgres did not start: {self.log()[-2000:]}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                pass
        except OSError:
            return False
        done = subprocess.run(
            [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
            check=False,
        )
        return done.returncode == 0

    def psql(self, sql: str) -> str:
        """One statement's rows, as psql prints them unaligned (for a test's checks)."""
        done = subprocess.run(
            [str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
             "-d", "postgres", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
            check=True, capture_output=True, text=True,
        )
        return done.stdout.strip()

    def log(self) -> str:
        try:
            return (self.dir / "log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """A fast shutdown (SIGINT): connections are ended, as a restart ends them."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server():
    server = PgServer()
    server.start()
    yield server
    server.remove()
