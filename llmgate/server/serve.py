"""Serving an app: the listening socket, signals, and what every connection gets.

`run()` is what `python -m llmgate` does; `start()` serves the same app on a socket inside
a running loop (tests, a worker). Every connection gets what a voice call needs: a caller
that hangs up cancels its turn; one that acknowledges nothing for `send_timeout_s` is
dropped by the kernel; one whose request headers do not arrive within `read_timeout_s`, or
pass `MAX_HEAD_BYTES`, is dropped by us, and so is one opened past what the open-file limit
holds (aiohttp has no such limits: aiohttp_compat.py's `GuardedSite` adds them; the body's
own limit is the handler's).

Signals: SIGTERM (or SIGINT) stops accepting and lets streams in flight finish for up to
`drain_s`, then the process exits 0; a second one exits at once. SIGHUP calls `on_hup`
(the config is read again).

What a caller sends is never inflated: a request body with a `Content-Encoding` is refused
(415, by the middleware) and aiohttp's decompression is off, so a small gzip body cannot
grow into a gigabyte on the loop. A body the handler did not read (a 401, 404, 413, 415
before it) is not drained either: the connection is closed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from llmgate.server.aiohttp_compat import GuardedSite
from llmgate.server.limits import open_files

log = logging.getLogger("llmgate")

# A caller hanging up cancels its turn (barge-in); the turn line replaces the access log.
RUNNER_OPTIONS: dict[str, Any] = {
    "handler_cancellation": True,
    "access_log": None,
    "auto_decompress": False,  # nothing a caller sends is inflated (the middleware's 415)
    "lingering_time": 0,  # an unread body is not drained: its connection is closed
}
SHUTDOWN = "llmgate is shutting down"  # the cancel message of a request cut by the drain
CUT_S = 1.0  # after drain_s, how long the requests cut have to log their end
# the tasks of the turns being handled (app.py keeps it), for the drain to wait for or cut
IN_FLIGHT = web.AppKey("in_flight", set)
MAX_HEAD_BYTES = 64 * 1024  # a request's headers (Agora's are well under 2 KB)
IDLE_S = 75.0  # a connection with no request in flight is closed after this (nginx's default)


BACKLOG = 1024  # connections the kernel holds before llmgate accepts them


def listen(host: str, port: int, send_timeout_s: float, reuse_port: bool = False):
    host = host.strip("[]")  # "[::1]", as a URL spells it, is ::1
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # workers: one socket each on one port, the kernel spreads connections
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        # Accepted connections inherit it: the kernel drops a caller that acknowledges
        # nothing for this long, which cancels its turn. Once here, not per response.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(send_timeout_s * 1000))
    sock.bind((host, port))
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


async def start(
    app: web.Application, sock: socket.socket, drain_s: float = 5.0, read_timeout_s: float = 30.0
) -> web.AppRunner:
    """Serve `app` on `sock` in the running loop; `await runner.cleanup()` stops it, letting
    requests in flight finish for up to `drain_s`."""
    runner = web.AppRunner(
        app, shutdown_timeout=drain_s, keepalive_timeout=IDLE_S, **RUNNER_OPTIONS
    )  # (`drain` waits itself first: once it has, this timeout finds nothing left to wait)
    await runner.setup()
    # Every connection guarded: its headers timed and capped, and open ones counted.
    await GuardedSite(
        runner,
        sock,
        read_timeout_s=read_timeout_s,
        max_connections=max_connections(),
        max_head_bytes=MAX_HEAD_BYTES,
        backlog=BACKLOG,  # as listen() set it (aiohttp's own sites listen again at 128)
    ).start()
    return runner


def run(
    app: web.Application,
    sock: socket.socket,
    want_uvloop: bool,
    drain_s: float = 20.0,
    read_timeout_s: float = 30.0,
    on_hup: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Serve until SIGTERM or SIGINT (drained), and return the exit status."""
    # What exists now lives as long as the process: keep it out of the collector's sight.
    # A full collection over the ~40k objects of the imports paused the loop ~20 ms here;
    # frozen, it takes under 2 ms.
    gc.collect()
    gc.freeze()
    loop = _event_loop(want_uvloop)
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_serve(app, sock, drain_s, read_timeout_s, on_hup))
    finally:
        loop.close()


async def _serve(
    app: web.Application,
    sock: socket.socket,
    drain_s: float,
    read_timeout_s: float,
    on_hup: Callable[[], Awaitable[None]] | None,
) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def stop(name: str) -> None:
        if stopping.is_set():
            log.warning("%s again: exiting now, streams in flight cut off", name)
            os._exit(0)
        log.info("%s: no new connections; streams in flight have %gs to finish", name, drain_s)
        stopping.set()

    runner = await start(app, sock, drain_s, read_timeout_s)
    log.info("ready: serving on %s", _where(sock))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig.name)
    reloading: set[asyncio.Task] = set()
    if on_hup is not None:

        def hup() -> None:
            task = loop.create_task(on_hup())
            reloading.add(task)
            task.add_done_callback(reloading.discard)

        loop.add_signal_handler(signal.SIGHUP, hup)
    try:
        await stopping.wait()
        await drain(runner, app, drain_s)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("drained: exiting")
    return 0


async def drain(runner: web.AppRunner, app: web.Application, drain_s: float) -> None:
    """Stop accepting; let requests in flight finish for up to `drain_s`; then cut those
    left (each logs its turn as 503 `shutdown`) and close. aiohttp's own shutdown waits
    its timeout, cancels, then may wait it again: twice `drain_s`, past a systemd stop."""
    for site in list(runner.sites):
        await site.stop()
    if runner.server is not None:
        # Kept-alive connections take no new request: each closes once its answer is out
        # (an idle one at once).
        await asyncio.sleep(0)  # requests already read are handled first
        runner.server.pre_shutdown()
    tasks = app.get(IN_FLIGHT, set())
    if tasks:
        await asyncio.wait(set(tasks), timeout=drain_s)
    left = set(tasks)
    if left:
        log.warning("drain_s passed: cutting %d requests in flight", len(left))
        for task in left:
            task.cancel(SHUTDOWN)
        await asyncio.wait(left, timeout=CUT_S)
    await runner.cleanup()


def max_connections() -> int:
    """Open connections this process serves at once: what its open-file limit holds, some
    descriptors kept back for providers, files and the log."""
    soft = open_files()
    return 100_000 if soft is None else max(16, soft - 256)


def _where(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _event_loop(want_uvloop: bool) -> asyncio.AbstractEventLoop:
    """uvloop when asked for and installed (CPU per stream at c1: 0.70 -> 0.64 ms here)."""
    if want_uvloop:
        try:
            import uvloop
        except ImportError:
            log.warning("server.uvloop: uvloop is not installed; using asyncio's loop")
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()
