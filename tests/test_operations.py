"""Running llmgate: SIGTERM drains, slow clients are dropped, a caller's request id is kept."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from llmgate.app import create_app, reload
from llmgate.config import parse
from llmgate.server import serve
from tests.conftest import API_KEY, gateway_config, stream_chunks
from tests.test_upstream_failures import free_port

HI = [{"role": "user", "content": "hi"}]
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def config_text(port: int, upstream_url: str, extra: str = "", routes: str = "") -> str:
    return (
        f'[server]\nport = {port}\napi_keys = ["{API_KEY}"]\n{extra}\n'
        f'[providers.fake]\nbase_url = "{upstream_url}"\n'
        '[[routes]]\npath = "/chat/completions"\n' + routes
    )


class Child:
    """`python -m llmgate` in a child process, in front of a fake upstream of the test's."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc, self.port = proc, port
        self.config = Path()
        self.url = f"http://127.0.0.1:{port}"

    async def ready(self) -> None:
        async with aiohttp.ClientSession() as session:
            for _ in range(500):
                try:
                    async with session.get(f"{self.url}/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    await asyncio.sleep(0.02)
        raise AssertionError("llmgate did not start")

    async def stderr(self) -> str:
        assert self.proc.stderr is not None
        return (await self.proc.stderr.read()).decode()


@pytest.fixture
async def child(tmp_path: Path, upstream):
    made: list[Child] = []

    async def start(extra: str = "", routes: str = "") -> Child:
        port = free_port()
        path = tmp_path / "c.toml"
        path.write_text(config_text(port, upstream.url, extra, routes))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llmgate", "--config", str(path),
            stderr=asyncio.subprocess.PIPE, env={**os.environ},
        )
        made.append(Child(proc, port))
        made[-1].config = path
        await made[-1].ready()
        return made[-1]

    yield start
    for c in made:
        if c.proc.returncode is None:
            c.proc.kill()
            await c.proc.wait()


async def _post(session, url: str, model: str) -> aiohttp.ClientResponse:
    body = {"model": model, "messages": HI, "stream": True}
    return await session.post(f"{url}/v1/chat/completions", json=body, headers=HEADERS)


async def test_sigterm_lets_a_stream_finish_refuses_new_ones_and_exits_0(child, upstream):
    gw = await child("drain_s = 10")
    async with aiohttp.ClientSession() as session:
        resp = await _post(session, gw.url, "slow-words")  # ~0.6 s of answer
        assert resp.status == 200
        await resp.content.readline()
        gw.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        with pytest.raises(aiohttp.ClientConnectionError):  # no longer accepting
            await _post(session, gw.url, "text")
        chunks = stream_chunks((await resp.read()).lstrip(b"\n"))  # the rest, [DONE]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert await asyncio.wait_for(gw.proc.wait(), 10) == 0
    err = await gw.stderr()
    assert "SIGTERM" in err and "drained" in err and "Traceback" not in err


async def test_a_second_sigterm_exits_at_once(child, upstream):
    gw = await child("drain_s = 30")
    async with aiohttp.ClientSession() as session:
        resp = await _post(session, gw.url, "stall-mid")  # would never finish
        await resp.content.readline()
        gw.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        assert gw.proc.returncode is None  # draining
        gw.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(gw.proc.wait(), 5) == 0
        resp.close()


async def test_the_drain_ends_at_drain_s_not_twice_that(child, upstream):
    speech = '[[routes]]\npath = "/speech/chat/completions"\nspeech = true\n'
    gw = await child("drain_s = 1.5", speech)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        resp = await _post(session, gw.url, "stall-mid")
        await resp.content.readline()
        gw.proc.send_signal(signal.SIGTERM)
        started = loop.time()
        rest = await asyncio.wait_for(resp.read(), 10)  # told, not cut off
        assert b'"code":"shutdown"' in rest and b"[DONE]" not in rest, rest
        assert await asyncio.wait_for(gw.proc.wait(), 10) == 0
        took = loop.time() - started
    assert 1.4 < took < 2.6, took  # aiohttp's own shutdown took 2 x drain_s (3.0 s)
    err = await gw.stderr()
    # the cut-off turn has its line, saying why it ended
    assert "status=503" in err and "error=shutdown" in err, err
    assert err.index("ready: serving on") > err.index("starting on")
    # the start-up lines name every route, with the base_url an SDK needs for it
    assert f"route /speech/chat/completions (speech): base_url {gw.url}/v1/speech" in err


def app_of(upstream, **server):
    return create_app(parse(gateway_config(upstream.url, server=server), {}))


async def test_sighup_reloads_without_dropping_a_stream_and_refuses_a_bad_file(child, upstream):
    gw = await child()
    speech = '[[routes]]\npath = "/speech/chat/completions"\nspeech = true\n'
    async with aiohttp.ClientSession() as session:
        resp = await _post(session, gw.url, "slow-words")  # in flight across the reload
        await resp.content.readline()
        gw.config.write_text(config_text(gw.port, upstream.url, routes=speech))
        gw.proc.send_signal(signal.SIGHUP)

        async def speech_route() -> int:
            body = {"model": "markdown", "messages": HI}
            url = f"{gw.url}/v1/speech/chat/completions"
            async with session.post(url, json=body, headers=HEADERS) as r:
                return r.status

        for _ in range(200):  # the new route appears without a restart
            if await speech_route() == 200:
                break
            await asyncio.sleep(0.02)
        assert await speech_route() == 200
        chunks = stream_chunks((await resp.read()).lstrip(b"\n"))  # the old turn, whole
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        gw.config.write_text(config_text(gw.port, upstream.url, "bogus = 1", speech))
        gw.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert await speech_route() == 200  # the running config stays
        assert gw.proc.returncode is None
    gw.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(gw.proc.wait(), 10) == 0
    err = await gw.stderr()
    assert "config reloaded" in err
    assert "config not reloaded, the running one stays: server.bogus" in err


async def test_headers_that_trickle_in_are_dropped(upstream):
    loop = asyncio.get_running_loop()
    # llmgate's own serving (not aiohttp's test server) is what guards the connection
    sock = serve.listen("127.0.0.1", 0, 30)
    runner = await serve.start(app_of(upstream), sock, read_timeout_s=0.3)
    port = sock.getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and no more
        started = loop.time()
        assert await asyncio.wait_for(reader.read(), 3) == b""  # closed on us
        assert 0.25 < loop.time() - started < 2
        writer.close()
        # A keep-alive connection between requests is left alone, however long it waits.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
            assert head.startswith(b"HTTP/1.1 200")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            await asyncio.sleep(0.5)  # longer than read_timeout_s, idle
        writer.close()
    finally:
        await runner.cleanup()


async def test_a_body_that_trickles_in_is_408(upstream):
    sock = serve.listen("127.0.0.1", 0, 30)
    runner = await serve.start(app_of(upstream, read_timeout_s=0.3), sock, read_timeout_s=5)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"mess"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert head.startswith(b"HTTP/1.1 408")
        assert b"Connection: close" in head  # the unread rest would be its next request
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        assert b"server.read_timeout_s" in body and b"request_timeout" in body
        writer.close()
    finally:
        await runner.cleanup()


async def test_a_slow_but_steady_body_is_read_and_a_stalled_one_is_408(upstream):
    sock = serve.listen("127.0.0.1", 0, 30)
    runner = await serve.start(app_of(upstream, read_timeout_s=0.3), sock, read_timeout_s=5)
    body = json.dumps({"model": "text", "messages": HI}).encode()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        for i in range(0, len(body), 8):  # 1.5 s in all, 0.15 s apart: never a stall
            writer.write(body[i : i + 8])
            await asyncio.sleep(1.5 * 8 / len(body))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200"), head
        writer.close()
    finally:
        await runner.cleanup()


async def test_a_reload_applies_max_body_mb_at_once(upstream):
    app = app_of(upstream, max_body_mb=0.01)
    client = TestClient(TestServer(app))
    await client.start_server()
    big = {"model": "text", "messages": [{"role": "user", "content": "x" * 20_000}]}
    try:
        resp = await client.post("/v1/chat/completions", json=big, headers=HEADERS)
        assert resp.status == 413
        raw = gateway_config(upstream.url, server={"max_body_mb": 1})
        await reload(app, parse(raw, {}))
        resp = await client.post("/v1/chat/completions", json=big, headers=HEADERS)
        assert resp.status == 200
        raw = gateway_config(upstream.url, server={"max_body_mb": 0.01})
        await reload(app, parse(raw, {}))
        chunked = b"x" * 30_000
        resp = await client.post(  # no Content-Length to refuse it by
            "/v1/chat/completions", data=_pieces(chunked), headers=HEADERS
        )
        assert resp.status == 413
    finally:
        await client.close()


async def _pieces(data: bytes):
    for i in range(0, len(data), 4096):
        yield data[i : i + 4096]


@pytest.mark.parametrize(
    ("sent", "kept"),
    [("call-42.turn_7:a", True), ("has space", False), ("x" * 200, False), ("-lead", False)],
)
async def test_a_callers_request_id_names_the_turn(gateway, caplog, sent, kept):
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    body = {"model": "text", "messages": HI, "stream": True}
    async with aiohttp.ClientSession() as session:
        headers = {**HEADERS, "X-Request-Id": sent}
        async with session.post(gateway.make_url("/v1/chat/completions"), json=body,
                                headers=headers) as resp:
            raw = await resp.read()
            got = resp.headers["X-Request-Id"]
    (turn,) = [r.turn for r in caplog.records if r.name == "llmgate.turn"]
    assert turn["request_id"] == got
    assert (got == sent) is kept
    if not kept:
        assert got.startswith("req_")
    assert json.loads(raw.split(b"\n\n")[0][6:])["id"]  # chunks still carry an id



class _Transport(asyncio.Transport):
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


async def test_a_body_read_just_after_its_headers_does_not_arm_the_header_timer():
    """Headers, then the body in the next loop turn, before the handler has run: the
    answer that follows takes longer than read_timeout_s and is not cut off."""
    from aiohttp import web

    async def slow(request):
        await request.read()
        await asyncio.sleep(0.6)  # a turn being streamed, its caller silent
        return web.Response(text="done")

    app = web.Application()
    app.router.add_post("/x", slow)
    sock = serve.listen("127.0.0.1", 0, 30)
    runner = await serve.start(app, sock, read_timeout_s=0.2)
    try:
        handler = next(iter(runner.sites)).connection()  # a guarded connection
        transport = _Transport()
        handler.connection_made(transport)
        body = b'{"a": 1}'
        head = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
        handler.data_received(head)
        asyncio.get_running_loop().call_soon(handler.data_received, body)
        await asyncio.sleep(1.0)
        assert not transport.closed and b"done" in transport.out
    finally:
        await runner.cleanup()


async def test_an_open_playground_feed_does_not_hold_the_drain(child, upstream):
    """The live view never ends by itself: shutting down ends it, so a browser tab left on
    the page does not keep the process for drain_s (twice, as aiohttp waits)."""
    gw = await child("drain_s = 30\n[playground]\nenabled = true")
    async with aiohttp.ClientSession() as session:
        feed = await session.get(f"{gw.url}/playground/events", headers=HEADERS)
        assert feed.status == 200
        gw.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(gw.proc.wait(), 10) == 0
        assert await feed.content.read() == b""  # ended cleanly
    assert "drained" in await gw.stderr()
