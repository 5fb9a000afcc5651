"""llmgate.http against hostile servers on 127.0.0.1: redirects, floods, hang-ups, silence.

The servers here (Elsewhere, Redirector, Flood) serve tests/test_outbound_*.py too, which
send every caller of llmgate.http to them.
"""

from __future__ import annotations

import asyncio
import gzip
import socket

import aiohttp
import pytest
from aiohttp import web

from llmgate import http
from tests.conftest import eventually

MB = 2**20
SECRET = "sk-hostile-0123456789"


class Elsewhere:
    """The other host a redirect points to: it must receive nothing at all."""

    def __init__(self) -> None:
        self.hits: list[tuple[str, dict[str, str], bytes]] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.any)

    async def any(self, request: web.Request) -> web.Response:
        self.hits.append((request.path, dict(request.headers), await request.read()))
        return web.json_response({"data": [], "passages": []})


class Redirector:
    """Answers everything with a 307 to Elsewhere (307: the method and the body go along)."""

    def __init__(self, to: str) -> None:
        self.to = to
        self.asked = 0
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.any)

    async def any(self, request: web.Request) -> web.Response:
        await request.read()
        self.asked += 1
        raise web.HTTPTemporaryRedirect(self.to + request.path_qs)


class Flood:
    """Answers everything with a chunked body (no Content-Length) far over any bound,
    counting the bytes it managed to write before the reader stopped it."""

    def __init__(
        self, status: int = 200, content_type: str = "application/json", prefix: bytes = b""
    ) -> None:
        self.status = status
        self.content_type = content_type
        self.prefix = prefix
        self.whole = 128 * MB
        self.written = 0
        self.asked = 0
        self.stopped = False
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.any)

    async def any(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.asked += 1
        resp = web.StreamResponse(status=self.status, headers={"Content-Type": self.content_type})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        piece = b"7" * 65536
        try:
            await resp.write(self.prefix)
            while self.written < self.whole:
                await resp.write(piece)
                self.written += len(piece)
            await resp.write_eof()
        except ConnectionError:
            pass  # the reader closed the connection: what a bounded read must do
        finally:
            self.stopped = True
        return resp

    async def stopped_near(self, bound: int) -> None:
        """The reader stopped it near `bound`: what it wrote is the bound plus the socket
        buffers between the two (a few MB on loopback), far short of the whole."""
        await eventually(lambda: self.stopped, timeout=10)
        assert self.written < bound + 16 * MB, self.written
        assert self.written < self.whole // 4, self.written


async def serve(aiohttp_server, fake):
    server = await aiohttp_server(fake.app)
    fake.url = str(server.make_url(""))  # no trailing slash: callers add their paths
    return fake


@pytest.fixture
async def elsewhere(aiohttp_server) -> Elsewhere:
    return await serve(aiohttp_server, Elsewhere())


@pytest.fixture
async def redirector(aiohttp_server, elsewhere) -> Redirector:
    return await serve(aiohttp_server, Redirector(elsewhere.url))


@pytest.fixture
async def make_flood(aiohttp_server):
    async def make(**kwargs) -> Flood:
        return await serve(aiohttp_server, Flood(**kwargs))

    return make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TIMEOUT = aiohttp.ClientTimeout(total=5)
HEADERS = {"api-key": SECRET, "Content-Type": "application/json"}


async def fetch(url: str, limit: int = MB, **kwargs) -> bytes:
    async with http.new_session() as session:
        return await http.fetch(
            session, "POST", url, limit, headers=HEADERS, timeout=TIMEOUT, data=b"{}", **kwargs
        )


# -- redirects -------------------------------------------------------------------------------


async def test_a_redirect_is_a_status_error_and_the_other_host_gets_nothing(
    redirector, elsewhere
):
    with pytest.raises(http.StatusError) as caught:
        await fetch(redirector.url + "/v1/embeddings?key=" + SECRET)
    assert caught.value.status == 307 and str(caught.value) == "answered HTTP 307"
    assert redirector.asked == 1 and elsewhere.hits == []


# -- bounded reads ---------------------------------------------------------------------------


async def test_a_chunked_answer_over_the_bound_is_too_large_and_its_connection_closed(
    make_flood,
):
    flood = await make_flood()
    with pytest.raises(http.TooLarge) as caught:
        await fetch(flood.url + "/x", limit=MB)
    assert str(caught.value) == "answered more than 1 MB"
    await flood.stopped_near(MB)


async def test_a_cut_read_keeps_the_first_bytes_and_closes_the_rest(make_flood):
    flood = await make_flood(content_type="text/plain", prefix=b"head:")
    async with (
        http.new_session() as session,
        http.request(session, "GET", flood.url + "/", headers={}, timeout=TIMEOUT) as resp,
    ):
        body = await http.read(resp, 1000, cut=True)
    assert len(body) == 1000 and body.startswith(b"head:7777")
    await flood.stopped_near(1000)


async def test_a_content_length_over_the_bound_is_refused_before_reading(aiohttp_server):
    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * (2 * MB))

    app = web.Application()
    app.router.add_post("/big", big)
    server = await aiohttp_server(app)
    with pytest.raises(http.TooLarge):
        await fetch(str(server.make_url("/big")), limit=MB)
    assert await fetch(str(server.make_url("/big")), limit=2 * MB) == b"x" * (2 * MB)


async def test_an_error_status_keeps_a_bounded_body(make_flood):
    flood = await make_flood(status=503, prefix=b'{"error": {"message": "')
    with pytest.raises(http.StatusError) as caught:
        await fetch(flood.url + "/x")
    assert caught.value.status == 503 and str(caught.value) == "answered HTTP 503"
    assert len(caught.value.body) == http.MAX_ERROR_BODY
    assert caught.value.body.startswith(b'{"error": {"message": "777')
    await flood.stopped_near(http.MAX_ERROR_BODY)


# -- failures, translated --------------------------------------------------------------------


async def test_a_refused_connection_is_unreachable_without_the_url():
    port = free_port()
    with pytest.raises(http.Unreachable) as caught:
        await fetch(f"http://127.0.0.1:{port}/v1?key={SECRET}")
    assert str(caught.value) == "could not be reached"
    assert isinstance(caught.value.__cause__, aiohttp.ClientConnectorError)  # kept for a trace
    assert str(port) not in repr(caught.value)


async def test_silence_is_timed_out_and_a_hang_up_broke_off(aiohttp_server):
    async def silent(request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response()

    async def hang_up(request: web.Request) -> web.StreamResponse:
        resp = web.Response(body=b"x" * 1000, headers={"Content-Length": "100000"})
        await resp.prepare(request)
        await resp.write_eof()
        assert request.transport is not None
        request.transport.close()
        return resp

    app = web.Application()
    app.router.add_post("/silent", silent)
    app.router.add_post("/hang-up", hang_up)
    server = await aiohttp_server(app)
    async with http.new_session() as session:
        with pytest.raises(http.TimedOut) as caught:
            await http.fetch(
                session, "POST", server.make_url("/silent"), MB, headers={},
                timeout=aiohttp.ClientTimeout(total=0.2),
            )
        assert str(caught.value) == "timed out"
        with pytest.raises(http.BrokenOff) as broken:
            await http.fetch(
                session, "POST", server.make_url("/hang-up"), MB, headers={}, timeout=TIMEOUT
            )
        assert str(broken.value) == "broke off its answer"


async def test_an_invalid_url_says_what_failed_without_quoting_it():
    with pytest.raises(http.HttpError) as caught:
        await fetch(f"http://[::1/v1?key={SECRET}")
    assert str(caught.value).startswith("failed (") and SECRET not in str(caught.value)


# -- sessions, URLs, credentials -------------------------------------------------------------


async def test_an_own_session_keeps_no_cookie_and_opens_once(aiohttp_server):
    seen: list[str | None] = []

    async def jar(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        resp = web.Response(text="ok")
        resp.set_cookie("session", "caller-a")
        return resp

    app = web.Application()
    app.router.add_get("/", jar)
    server = await aiohttp_server(app)
    own = http.OwnSession()
    try:
        for _ in range(2):
            async with http.request(
                own.get(), "GET", server.make_url("/"), headers={}, timeout=TIMEOUT
            ) as resp:
                assert await http.read(resp, 100) == b"ok"
        assert own.get() is own.get()
    finally:
        await own.aclose()
    assert seen == [None, None]
    await http.OwnSession().aclose()  # never opened: nothing to close


def test_join_keeps_the_query_and_bearer_skips_passthrough():
    url = http.join("https://x.example/openai/v1/?api-version=2024-10-01", "audio/speech")
    assert str(url) == "https://x.example/openai/v1/audio/speech?api-version=2024-10-01"
    assert str(http.join("http://h:1/v1", "/embeddings")) == "http://h:1/v1/embeddings"
    assert http.bearer("k") == {"Authorization": "Bearer k"}
    assert http.bearer("") == http.bearer(None) == http.bearer("passthrough") == {}


async def test_a_compressed_answer_is_refused_never_inflated(aiohttp_server):
    async def bomb(request: web.Request) -> web.Response:
        assert request.headers["Accept-Encoding"] == "identity"
        body = gzip.compress(b"\0" * (32 * 2**20))  # a 32 KB gzip of 32 MB
        return web.Response(body=body, headers={"Content-Encoding": "gzip"})

    app = web.Application()
    app.router.add_post("/x", bomb)
    server = await aiohttp_server(app)
    async with http.new_session() as session:
        with pytest.raises(http.Compressed):
            await http.fetch(
                session, "POST", server.make_url("/x"), 2**20, headers={},
                timeout=aiohttp.ClientTimeout(total=5),
            )
