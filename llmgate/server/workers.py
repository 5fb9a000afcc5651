"""`--workers N`: N llmgate processes on one port, and the supervisor that keeps them.

Each worker is `python -m llmgate ... --worker`: the same server as a single process, on a
socket of its own bound with SO_REUSEPORT, so the kernel spreads connections over them.
The supervisor serves nothing. It passes SIGTERM on (each worker drains, then the
supervisor exits 0; a second SIGTERM cuts them off), reads the config on SIGHUP and passes
it on only when it loads (a bad file is refused once, here, naming the key), and starts a
worker again when one dies. Metrics are added up across workers through prometheus-client's
multiprocess mode: a directory the supervisor makes and every worker writes to.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmgate import config as configuration

log = logging.getLogger("llmgate")

METRICS_PREFIX = "llmgate-metrics-"
SUPERVISOR_ENV = "LLMGATE_SUPERVISOR_PID"  # a worker's: whose death it follows
RESTART_S = 1.0  # a worker that keeps dying is started again at most this often


class Supervisor:
    def __init__(self, argv: list[str], count: int, config_path: str, host: str) -> None:
        self.argv = argv  # the worker's own command line, less --workers
        self.count = count
        self.config_path = config_path
        self.host = host
        self.workers: dict[int, subprocess.Popen] = {}  # slot -> process
        self.stopping = 0  # SIGTERMs seen
        self._started: dict[int, float] = {}

    def run(self) -> int:
        own_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
        if own_dir:
            sweep_metrics_dirs()
        metrics_dir = os.environ.setdefault(
            "PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-")
        )
        for old in Path(metrics_dir).glob("*.db"):  # a previous run's values are not ours
            old.unlink(missing_ok=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        signal.signal(signal.SIGHUP, self._reload)
        try:
            for slot in range(self.count):
                self._start(slot)
            log.info("supervising %d workers (pids %s)", self.count, self._pids())
            while self.workers:
                self._reap()
                time.sleep(0.05)
            if not self.stopping:
                log.error("no worker is left running")
                return 1
        finally:
            for proc in self.workers.values():
                proc.kill()
            if own_dir:
                shutil.rmtree(metrics_dir, ignore_errors=True)
        log.info("every worker has exited")
        return 0

    def _start(self, slot: int) -> None:
        now = time.monotonic()
        last = self._started.get(slot)
        if last is not None and now - last < RESTART_S:
            time.sleep(RESTART_S - (now - last))
        if self.stopping:
            return  # a SIGTERM came while waiting: no new worker to stop
        # A session of its own: Ctrl-C reaches the supervisor alone, which drains each.
        self.workers[slot] = subprocess.Popen(
            [sys.executable, "-m", "llmgate", *self.argv],
            start_new_session=True,
            env={**os.environ, SUPERVISOR_ENV: str(os.getpid())},
        )
        self._started[slot] = time.monotonic()
        if self.stopping:  # a SIGTERM came while it started: the handler did not see it
            self.workers[slot].send_signal(signal.SIGTERM)

    def _reap(self) -> None:
        for slot, proc in list(self.workers.items()):
            status = proc.poll()
            if status is None:
                continue
            _dead(proc.pid)
            del self.workers[slot]
            if self.stopping:
                continue
            if status == configuration.EXIT_CONFIG:
                # A worker refusing its config at start (it changed on disk since):
                # starting it again would fail the same way.
                log.error("worker %d exited: its config does not load; not restarted", proc.pid)
                continue
            log.error("worker %d exited with %s; starting another", proc.pid, status)
            self._start(slot)

    def _stop(self, signum: int, _frame: object) -> None:
        self.stopping += 1
        how = "draining" if self.stopping == 1 else "at once"
        log.info("%s: stopping %d workers (%s)", signal.Signals(signum).name, len(self.workers),
                 how)
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def _reload(self, _signum: int, _frame: object) -> None:
        try:
            configuration.load_to_serve(self.config_path, self.host)
        except configuration.ConfigError as exc:
            log.error("config not reloaded, the running one stays: %s", exc)
            return
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGHUP)

    def _pids(self) -> str:
        return ", ".join(str(p.pid) for p in self.workers.values())


def sweep_metrics_dirs() -> None:
    """Remove the metrics folders of supervisors that died without cleaning up (SIGKILL,
    OOM): each is named by its supervisor's pid, and only a dead one's is taken."""
    for path in Path(tempfile.gettempdir()).glob(f"{METRICS_PREFIX}*-*"):
        pid = path.name.removeprefix(METRICS_PREFIX).partition("-")[0]
        if not pid.isdigit() or not path.is_dir() or path.is_symlink():
            continue
        try:
            if path.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("removing a metrics folder left by a supervisor that died: %s", path)
            shutil.rmtree(path, ignore_errors=True)
        except OSError:  # alive under another user, or gone meanwhile
            continue


def _dead(pid: int) -> None:
    """A gone worker's live gauges leave the sum (its counters stay counted)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def follow_parent() -> None:
    """In a worker: a supervisor killed outright (SIGKILL) takes its workers along, each
    draining as on SIGTERM, rather than leaving them holding the port (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    # A supervisor that died before the line above leaves no signal to come: look.
    supervisor = os.environ.get(SUPERVISOR_ENV, "")
    if supervisor.isdigit() and os.getppid() != int(supervisor):
        log.warning("the supervisor (pid %s) is gone: this worker exits", supervisor)
        sys.exit(0)


def worker_argv(argv: list[str]) -> list[str]:
    """The worker's command line: the supervisor's, without --workers, with --worker."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--workers":
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            skip = nxt.isdigit()
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return [*out, "--worker"]


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

