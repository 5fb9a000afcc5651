"""What guards a connection aiohttp serves, and the one place llmgate reaches under aiohttp.

aiohttp bounds neither how long a request's headers take to arrive, nor how many bytes of
them it keeps (~1 MB: 128 headers of up to 8 KB), nor how many connections are open.
`GuardedSite` serves a runner's app on a socket with all three:

- the header timer: a connection's first request's headers must be whole within
  `read_timeout_s` of its opening, each next request's within `read_timeout_s` of its first
  byte, or the connection is closed (nothing sent, or a trickle: slowloris). A request's
  body does not arm it (the handler bounds that); between requests, aiohttp's keep-alive
  timeout closes an idle connection;
- the head cap: a connection sending more than `max_head_bytes` of request headers is
  closed, so silent callers cannot hold much memory each;
- the connection cap: past `max_connections` open, a new connection is closed as it opens.

How, in public API: each accepted connection's protocol is a `GuardedConnection`, an
asyncio Protocol that makes an aiohttp RequestHandler with the runner's `web.Server` (its
protocol factory), hands it every call and byte, and watches. Connections are counted
here; a request's handler ending is seen by wrapping `web.Server.request_handler`; the
listener is a `web.BaseSite`, so the runner stops it like any site.

What aiohttp has no public way to tell is the moment a request's headers are whole: its
parser hands the request over inside `data_received`, before any handler, request factory
or middleware sees it, and bytes read with the headers or just after may be its body (not
headers to count or time). So this module relies on these, here only, and
tests/test_aiohttp_compat.py fails, naming the one that changed, if an aiohttp release
changes them:

- `RequestHandler._request_count` (private, an int): how many requests the parser has
  handed over on this connection; it grows within the `data_received` in which a request's
  headers become whole. Read once per `data_received`, and when a header timer fires.
- `web.Server.request_handler` (public name, its use undocumented): what a RequestHandler
  made after it is set calls for each request, so replacing it before serving sees every
  request's handler end.
- `web.BaseSite` subclassed (public, its subclassing undocumented): `super().start()` and
  `super().stop()` register and unregister the site with its runner.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

log = logging.getLogger("llmgate")

_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class _Ending:
    """`web.Server.request_handler`, counting each request's end on its connection."""

    __slots__ = ("inner", "live")

    def __init__(self, inner: _Handler) -> None:
        self.inner = inner
        self.live: dict[web.RequestHandler, GuardedConnection] = {}

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await self.inner(request)
        finally:
            connection = self.live.get(request.protocol)
            if connection is not None:
                connection._ended += 1


class GuardedSite(web.BaseSite):
    """`runner`'s app served on `sock` (bound and listening), every connection guarded."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        *,
        read_timeout_s: float,
        max_connections: int,
        max_head_bytes: int,
        backlog: int = 128,  # what aiohttp's SockSite listens with
    ) -> None:
        super().__init__(runner, backlog=backlog)
        server = runner.server
        assert server is not None  # (BaseSite has checked)
        ending = server.request_handler
        if not isinstance(ending, _Ending):  # (a second site on one runner shares it)
            ending = server.request_handler = _Ending(server.request_handler)
        self.server = server
        self.sock = sock
        self.backlog = backlog
        self.live = ending.live  # each open connection's aiohttp handler -> its guard
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections
        self.max_head_bytes = max_head_bytes
        self.open = 0  # connections open (those being refused too, until closed)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.listener: asyncio.AbstractServer | None = None
        host, port = sock.getsockname()[:2]
        self._name = f"http://{f'[{host}]' if ':' in host else host}:{port}"

    @property
    def name(self) -> str:
        return self._name

    def connection(self) -> GuardedConnection:
        """The protocol of a connection accepted on this site."""
        return GuardedConnection(self)

    async def start(self) -> None:
        await super().start()
        self.loop = asyncio.get_running_loop()
        self.listener = await self.loop.create_server(
            self.connection, sock=self.sock, backlog=self.backlog
        )

    async def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        await super().stop()


class GuardedConnection(asyncio.Protocol):
    """One connection: aiohttp's handler speaks HTTP; this times and counts its headers."""

    __slots__ = (
        "_armed_at",
        "_ended",
        "_handler",
        "_head_bytes",
        "_parsed",
        "_site",
        "_timer",
        "_transport",
    )

    def __init__(self, site: GuardedSite) -> None:
        self._site = site
        self._handler: web.RequestHandler | None = None  # None: refused
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = 0  # requests handed over when the timer was armed
        self._parsed = 0  # requests handed over to aiohttp's handler, as last seen
        self._ended = 0  # of those, how many the app's handler has finished
        self._head_bytes = 0  # of the request headers still arriving

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        site = self._site
        site.open += 1
        self._transport = transport  # type: ignore[assignment]
        if site.open > site.max_connections:
            # Past what the open-file limit holds: this one goes, the others are served.
            log.warning("%d connections open, the most: a new one is closed",
                        site.max_connections)
            transport.close()
            return
        handler = site.server()  # aiohttp's own protocol for this connection
        self._handler = handler
        site.live[handler] = self
        handler.connection_made(transport)
        assert site.loop is not None
        self._timer = site.loop.call_later(site.read_timeout_s, self._too_slow)

    def data_received(self, data: bytes) -> None:
        handler = self._handler
        if handler is None:
            return
        handler.data_received(data)
        parsed = handler._request_count
        if parsed != self._parsed:  # headers whole: the handler takes over
            self._parsed = parsed
            self._head_bytes = 0
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        elif parsed != self._ended:
            pass  # a request being handled: its body's bytes (the handler bounds those)
        else:
            # aiohttp keeps headers still arriving (up to ~1 MB of them): a connection
            # that sends more than a request's headers could be before any key is
            # checked is closed, so silent callers cannot hold much memory each.
            site = self._site
            self._head_bytes += len(data)
            if self._head_bytes > site.max_head_bytes:
                log.info("a client's request headers passed %d bytes: dropped",
                         site.max_head_bytes)
                self._transport.close()  # type: ignore[union-attr]
                return
            if self._timer is None:
                self._armed_at = parsed
                self._timer = site.loop.call_later(  # type: ignore[union-attr]
                    site.read_timeout_s, self._too_slow
                )

    def _too_slow(self) -> None:
        self._timer = None
        handler = self._handler
        # No request handed over since the timer was armed (with none being handled).
        if handler is not None and handler._request_count == self._armed_at:
            log.info("a client's request headers did not arrive within %gs: dropped",
                     self._site.read_timeout_s)  # (nothing at all, or a trickle)
            self._transport.close()  # type: ignore[union-attr]

    def eof_received(self) -> Any:
        return None if self._handler is None else self._handler.eof_received()

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._site.open -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        handler = self._handler
        if handler is not None:
            self._site.live.pop(handler, None)
            handler.connection_lost(exc)
