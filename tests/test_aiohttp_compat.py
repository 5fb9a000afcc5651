"""What llmgate/server/aiohttp_compat.py relies on in aiohttp, checked on real connections to
a real server on 127.0.0.1: should an aiohttp release change one, a test here fails naming
it and the aiohttp version. Then what the module does, through it."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest
from aiohttp import web

from llmgate.server import serve
from llmgate.server.aiohttp_compat import GuardedConnection, GuardedSite

HEAD = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"


def relied_on(ok: bool, what: str) -> None:
    assert ok, (
        f"aiohttp {aiohttp.__version__}: {what}. llmgate/server/aiohttp_compat.py relies on it "
        "(its docstring says what for): change that module for this aiohttp"
    )


def an_app(started: list[str] | None = None, hold: asyncio.Event | None = None) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        if started is not None:
            started.append(request.path)
        body = await request.read()
        if hold is not None:
            await hold.wait()
        return web.Response(body=b"got %d" % len(body))

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_get("/hello", hello)
    return app


@contextlib.asynccontextmanager
async def served(app: web.Application, read_timeout_s: float = 30.0, max_connections: int = 100,
                 max_head_bytes: int = serve.MAX_HEAD_BYTES):
    """`app` served through the module, as serve.start does: (runner, site, port)."""
    sock = serve.listen("127.0.0.1", 0, 30)
    runner = web.AppRunner(app, keepalive_timeout=serve.IDLE_S, **serve.RUNNER_OPTIONS)
    await runner.setup()
    site = GuardedSite(runner, sock, read_timeout_s=read_timeout_s,
                       max_connections=max_connections, max_head_bytes=max_head_bytes)
    await site.start()
    try:
        yield runner, site, sock.getsockname()[1]
    finally:
        await runner.cleanup()


async def eventually(check, what: str, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():
        if loop.time() > end:
            raise AssertionError(what)
        await asyncio.sleep(0.005)


async def answer(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head + await asyncio.wait_for(reader.readexactly(length), 3)


# --- what the module relies on -------------------------------------------------------


async def test_request_count_is_an_int_on_a_live_handler_that_counts_requests_handed_over():
    async with served(an_app()) as (runner, site, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await eventually(lambda: len(site.live) == 1, "the connection was not accepted")
        (handler,) = runner.server.connections  # aiohttp's own handler of that connection
        relied_on(
            isinstance(handler, web.RequestHandler),
            f"web.Server() made a {type(handler).__name__}, not a web.RequestHandler",
        )
        relied_on(
            hasattr(handler, "_request_count"), "RequestHandler has no `_request_count`"
        )
        relied_on(
            type(handler._request_count) is int and handler._request_count == 0,
            f"RequestHandler._request_count of a new connection is "
            f"{handler._request_count!r}, not the int 0",
        )
        for n in (1, 2):  # one per request on a kept-alive connection
            writer.write(HEAD % 2 + b"{}")
            assert (await answer(reader)).endswith(b"got 2")
            relied_on(
                handler._request_count == n,
                f"RequestHandler._request_count is {handler._request_count!r} after {n} "
                f"requests on its connection, not {n}",
            )
        writer.close()


async def test_request_count_grows_in_the_data_received_where_headers_become_whole(monkeypatch):
    """Within that very call, before any handler runs; and not again for the body's bytes."""
    seen: list[tuple[int, int, int]] = []  # (bytes, count after, handlers started by then)
    started: list[str] = []
    hold = asyncio.Event()
    original = GuardedConnection.data_received

    def data_received(self, data: bytes) -> None:
        original(self, data)
        seen.append((len(data), self._handler._request_count, len(started)))

    monkeypatch.setattr(GuardedConnection, "data_received", data_received)
    async with served(an_app(started, hold)) as (_, _, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\n")
        await eventually(lambda: len(seen) == 1, "the first bytes were not received")
        relied_on(seen[0][1] == 0, "RequestHandler._request_count grew before the headers "
                  "were whole")
        writer.write(b"Content-Length: 10\r\n\r\n12345")  # the headers' end, half the body
        await eventually(lambda: len(seen) == 2, "the headers' end was not received")
        relied_on(
            seen[1][1:] == (1, 0),
            "RequestHandler._request_count did not grow within the data_received in which "
            f"a request's headers became whole, before its handler ran (count, handlers "
            f"started: {seen[1][1:]})",
        )
        await eventually(lambda: started == ["/echo"], "the handler did not start")
        writer.write(b"67890")  # the rest of the body, while its handler runs
        await eventually(lambda: len(seen) == 3, "the body's end was not received")
        relied_on(seen[2][1] == 1, "RequestHandler._request_count grew with a body's bytes")
        hold.set()
        assert (await answer(reader)).endswith(b"got 10")
        writer.close()


async def test_server_request_handler_is_what_each_new_connections_handler_calls():
    async with served(an_app()) as (runner, site, port):
        ending = runner.server.request_handler
        relied_on(
            type(ending).__name__ == "_Ending",
            "web.Server.request_handler, once set, is not kept (the module's wrap is gone)",
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await eventually(lambda: len(site.live) == 1, "the connection was not accepted")
        (connection,) = site.live.values()
        for n in (1, 2):
            writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await answer(reader)).endswith(b"hello")
            relied_on(
                connection._ended == n,
                "a RequestHandler made after web.Server.request_handler was replaced did "
                f"not call the replacement for each request ({connection._ended} of {n})",
            )
        writer.close()


async def test_a_base_site_subclass_is_started_and_stopped_by_its_runner():
    async with served(an_app()) as (runner, site, port):
        relied_on(runner.sites == {site}, "BaseSite.start() did not register the site with "
                  "its runner")
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/hello") as resp,
        ):
            assert await resp.text() == "hello"
    relied_on(runner.sites == set(), "runner.cleanup() did not stop a BaseSite subclass")
    with pytest.raises(OSError):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()


# --- what the module does, through it -----------------------------------------------


async def test_headers_then_a_body_in_the_next_loop_turn_do_not_arm_the_header_timer():
    """Headers, then the body in the next loop turn, before the handler has run: the
    answer that follows takes longer than read_timeout_s and is not cut off."""

    class Transport(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.closed = False
            self.out = b""

        def get_extra_info(self, name, default=None):
            return default

        def write(self, data) -> None:
            self.out += data

        def writelines(self, data) -> None:
            self.out += b"".join(data)

        def is_closing(self) -> bool:
            return self.closed

        def close(self) -> None:
            self.closed = True

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

    async def slow(request):
        await request.read()
        await asyncio.sleep(0.6)  # a turn being streamed, its caller silent
        return web.Response(text="done")

    app = web.Application()
    app.router.add_post("/x", slow)
    async with served(app, read_timeout_s=0.2) as (_, site, _):
        connection = site.connection()
        transport = Transport()
        connection.connection_made(transport)
        body = b'{"a": 1}'
        connection.data_received(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                                 % len(body))
        asyncio.get_running_loop().call_soon(connection.data_received, body)
        await asyncio.sleep(1.0)
        assert not transport.closed and b"done" in transport.out
        connection.connection_lost(None)


async def test_a_body_read_with_its_headers_is_not_counted_as_headers():
    big = b"x" * (3 * serve.MAX_HEAD_BYTES)  # past the head cap, in one write with its head
    async with served(an_app()) as (_, _, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEAD % len(big) + big)
        assert (await answer(reader)).endswith(b"got %d" % len(big))
        writer.write(HEAD % len(big) + big)  # and on the next request of the connection
        assert (await answer(reader)).endswith(b"got %d" % len(big))
        writer.close()


async def test_the_next_requests_headers_that_trickle_in_are_dropped():
    loop = asyncio.get_running_loop()
    async with served(an_app(), read_timeout_s=0.3) as (_, _, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await answer(reader)).endswith(b"hello")
        await asyncio.sleep(0.5)  # idle between requests: left alone
        writer.write(b"GET /hello HTTP/1.1\r\n")  # and no more
        started = loop.time()
        assert await asyncio.wait_for(reader.read(), 3) == b""
        assert 0.25 < loop.time() - started < 2
        writer.close()


async def test_a_refused_connection_frees_its_place():
    async with served(an_app(), max_connections=2) as (_, site, port):
        first = await asyncio.open_connection("127.0.0.1", port)
        second = await asyncio.open_connection("127.0.0.1", port)
        third = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(third[0].read(), 3) == b""  # past the most: closed
        first[1].close()
        await eventually(lambda: site.open == 1, f"{site.open} connections counted, not 1")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # its place
        writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await answer(reader)).endswith(b"hello")
        for _, w in (second, third, (reader, writer)):
            w.close()


async def test_a_caller_slow_to_read_pauses_and_resumes_the_answers_writes():
    """The transport tells the connection to pause and resume writing; aiohttp's handler,
    which the writes wait on, hears it."""
    big = b"y" * (16 * 2**20)  # far past what the socket buffers hold

    async def large(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(0, len(big), 2**20):
            await resp.write(big[i : i + 2**20])
            paused.append(request.protocol.writing_paused)
        await resp.write_eof()
        return resp

    paused: list[bool] = []
    app = web.Application()
    app.router.add_get("/large", large)
    async with served(app) as (_, _, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /large HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await eventually(lambda: len(paused) > 0, "nothing written")
        await asyncio.sleep(0.3)  # not reading: the server's writes wait
        assert len(paused) < 16
        raw = await asyncio.wait_for(reader.read(), 10)  # read: they go on, to the end
        body = raw.split(b"\r\n\r\n", 1)[1]
        assert body.endswith(b"0\r\n\r\n") and body.count(b"y") == len(big)
        assert len(paused) == 16
        writer.close()


def test_the_guard_holds_on_uvloop():
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        async with served(an_app(), read_timeout_s=0.3) as (_, _, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(HEAD % 2 + b"{}")
            assert (await answer(reader)).endswith(b"got 2")
            writer.write(b"GET /hello HTTP/1.1\r\n")  # and no more
            assert await asyncio.wait_for(reader.read(), 3) == b""
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(), 3) == b""  # sent nothing: closed
            writer.close()

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
