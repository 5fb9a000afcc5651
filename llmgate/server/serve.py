"""Serving an app: the listening socket, signals, and what every connection gets.

`run()` is what `python -m llmgate` does; `start()` serves the same app on a socket inside
a running loop (tests, a worker). Every connection gets what a voice call needs: a caller
that hangs up cancels its turn; one that acknowledges nothing for `send_timeout_s` is
dropped by the kernel; one whose request headers do not arrive within `read_timeout_s` is
dropped by us (aiohttp has no such limit; the body's own limit is the handler's).

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
from aiohttp.web_protocol import RequestHandler

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
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class _GuardedHandler(RequestHandler):
    """A connection whose first request's headers must arrive within `read_timeout_s` of
    its opening, and each next request's within `read_timeout_s` of its first byte: a
    client that sends nothing, or a trickle (slowloris), cannot hold a connection. Body
    bytes of a request being handled do not arm it (the handler bounds those); between
    requests, aiohttp's keep-alive timeout (`IDLE_S`) closes an idle connection."""

    read_timeout_s = 30.0
    max_connections = 100_000
    _read_timer: asyncio.TimerHandle | None = None
    _armed_at_count = 0
    _head_bytes = 0  # of the request headers still arriving
    _body: Any = None  # the last request's body, while it is still arriving

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        if manager is not None and len(manager.connections) > self.max_connections:
            # Past what the open-file limit holds: this one goes, the others are served.
            log.warning("%d connections open, the most: a new one is closed",
                        self.max_connections)
            transport.close()
            return
        self._read_timer = self._loop.call_later(self.read_timeout_s, self._too_slow)

    def data_received(self, data: bytes) -> None:
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:  # headers whole: the handler takes over
            self._disarm()
            self._head_bytes = 0
            self._body = self._messages[-1][1] if self._messages else None
        elif self._body is not None and not self._body.is_eof():
            pass  # a body's bytes (the handler bounds those)
        elif not self._request_in_progress and data and not self._force_close:
            # aiohttp keeps headers still arriving (up to ~1 MB of them): a connection
            # that sends more than a request's headers could be before any key is
            # checked is closed, so silent callers cannot hold much memory each.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES and self.transport is not None:
                log.info("a client's request headers passed %d bytes: dropped", MAX_HEAD_BYTES)
                self.transport.close()
                return
            if self._read_timer is None:
                self._armed_at_count = count
                self._read_timer = self._loop.call_later(self.read_timeout_s, self._too_slow)

    def _too_slow(self) -> None:
        self._read_timer = None
        if self._request_in_progress or self._current_request is not None or self._messages:
            return  # a request is being handled (armed on its body in the turn before)
        if self._request_count == self._armed_at_count and self.transport is not None:
            log.info("a client's request headers did not arrive within %gs: dropped",
                     self.read_timeout_s)  # (nothing at all, or a trickle)
            self.transport.close()

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class _GuardedServer(web.Server):
    read_timeout_s = 30.0
    max_connections = 100_000

    def __call__(self) -> RequestHandler:
        handler = _GuardedHandler(self, loop=self._loop, **self._kwargs)
        handler.read_timeout_s = self.read_timeout_s
        handler.max_connections = self.max_connections
        return handler


async def start(
    app: web.Application, sock: socket.socket, drain_s: float = 5.0, read_timeout_s: float = 30.0
) -> web.AppRunner:
    """Serve `app` on `sock` in the running loop; `await runner.cleanup()` stops it, letting
    requests in flight finish for up to `drain_s`."""
    runner = web.AppRunner(
        app, shutdown_timeout=drain_s, keepalive_timeout=IDLE_S, **RUNNER_OPTIONS
    )  # (`drain` waits itself first: once it has, this timeout finds nothing left to wait)
    await runner.setup()
    # aiohttp makes its own Server; ours differs only in the handler it makes per
    # connection (tests/test_serve.py fails should an aiohttp release change that).
    server = runner.server
    assert server is not None and type(server) is web.Server
    server.__class__ = _GuardedServer
    server.read_timeout_s = read_timeout_s  # type: ignore[attr-defined]
    server.max_connections = max_connections()  # type: ignore[attr-defined]
    await web.SockSite(runner, sock).start()
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
