"""Hostile input at llmgate's own doors: what a caller without a key, a hostile provider or a
neighbouring tenant can send, each sent here (issue: an adversarial probe's findings)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging

import aiohttp
import pytest
from aiohttp import web

from llmgate.app import create_app
from llmgate.config import parse
from llmgate.errors import ApiError
from llmgate.obs.logging import _Formatter
from llmgate.server import serve
from llmgate.sse import MAX_LINE, SSEDecoder, SSEError
from llmgate.turn import Turn
from llmgate.upstream.targets import MAX_RETRY_AFTER_S, retry_after_s
from tests.conftest import API_KEY, gateway_config
from tests.test_cancellation import agora_body

AUTH = {"Authorization": f"Bearer {API_KEY}"}
HI = [{"role": "user", "content": "hi"}]
SECRET = "sk-upstream-Secret-4242"


async def serving(raw: dict, read_timeout_s: float = 30.0):
    """llmgate's own serving (not aiohttp's test server): what guards a connection."""
    sock = serve.listen("127.0.0.1", 0, 30)
    runner = await serve.start(create_app(parse(raw, {})), sock, read_timeout_s=read_timeout_s)
    return runner, sock.getsockname()[1]


async def head_of(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)


# --- a compressed request body is refused, never inflated ---------------------------------


async def test_a_compressed_body_is_415_before_any_key_and_its_connection_closes(upstream):
    runner, port = await serving(gateway_config(upstream.url))
    bomb = gzip.compress(b"\0" * (64 * 2**20), 1)  # 64 MB inflated, ~64 KB sent
    try:
        for path in ("/v1/chat/completions", "/no/such/path"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(bomb)}\r\n\r\n".encode()
                + bomb
            )
            head = await head_of(reader)
            assert head.startswith(b"HTTP/1.1 415"), head
            body = json.loads(await asyncio.wait_for(reader.read(), 5))  # then closed
            assert body["error"]["code"] == "unsupported_media_type"
            writer.close()
        assert upstream.requests == []
    finally:
        await runner.cleanup()


async def test_a_body_left_unread_is_not_drained_its_connection_is_closed(upstream):
    runner, port = await serving(gateway_config(upstream.url))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # no key: a 401 before the body is read; 10 MB announced, 1 KB sent, and no more
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 10000000\r\n\r\n" + b"{" * 1024
        )
        assert (await head_of(reader)).startswith(b"HTTP/1.1 401")
        await asyncio.wait_for(reader.read(), 3)  # closed: not kept 10 s to drain the rest
        writer.close()
    finally:
        await runner.cleanup()


async def test_a_connection_that_sends_nothing_is_closed(upstream):
    runner, port = await serving(gateway_config(upstream.url), read_timeout_s=0.3)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 3) == b""  # not held for an hour
        writer.close()
    finally:
        await runner.cleanup()


# --- what a hostile provider sends -------------------------------------------------------


def hostile(handler) -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    return app


async def gateway_for(aiohttp_server, handler, **sections):
    provider = await aiohttp_server(hostile(handler))
    raw = gateway_config(str(provider.make_url("/v1")), **sections)
    raw["providers"]["fake"]["api_key"] = SECRET
    raw["providers"]["fake"]["headers"] = {"api-key": "azure-Secret-77"}
    return await aiohttp_server(create_app(parse(raw, {})))


async def post(gateway, body: dict, headers=AUTH) -> tuple[int, bytes, dict]:
    async with aiohttp.ClientSession() as s:
        url = gateway.make_url("/v1/chat/completions")
        async with s.post(url, json=body, headers=headers) as resp:
            return resp.status, await resp.read(), {k.lower(): v for k, v in resp.headers.items()}


def sse_chunk(text: str, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
    return b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n"


async def test_a_compressed_stream_is_a_502_never_inflated(aiohttp_server):
    async def gzipped(request: web.Request) -> web.StreamResponse:
        assert request.headers["Accept-Encoding"] == "identity"
        body = gzip.compress(b"data: " + b"x" * 2**20 + b"\n" * 1)
        return web.Response(
            body=body, headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"}
        )

    gateway = await gateway_for(aiohttp_server, gzipped)
    for stream in (True, False):
        status, body, _ = await post(gateway, {"model": "text", "messages": HI, "stream": stream})
        assert status == 502, body
        assert b"compressed" in body


def test_data_lines_without_an_end_cannot_pile_up():
    decoder = SSEDecoder()
    line = b"data: " + b"a" * 4096 + b"\n"
    with pytest.raises(SSEError):
        for _ in range(MAX_LINE // 4096 + 2):
            decoder.feed(line)
    decoder = SSEDecoder()  # an event just under the bound is still one event
    events = decoder.feed(line * (MAX_LINE // (len(line) + 64) - 1) + b"\n")
    assert len(events) == 1
    decoder = SSEDecoder()  # tiny lines cost their bookkeeping: not 15x the bound
    with pytest.raises(SSEError):
        decoder.feed(b"data: x\n" * (MAX_LINE // 64 + 1))


async def test_a_non_streamed_answer_that_trickles_gets_a_504(aiohttp_server):
    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        while True:  # a byte every 10 ms: never silent, never done
            await resp.write(b" ")
            await asyncio.sleep(0.01)

    gateway = await gateway_for(aiohttp_server, trickle, server={"answer_timeout_s": 0.5})
    status, body, headers = await asyncio.wait_for(
        post(gateway, {"model": "text", "messages": HI}), 5
    )
    assert status == 504
    assert b"server.answer_timeout_s" in body and headers["x-request-id"].encode() in body


@pytest.mark.parametrize("stream", [True, False])
async def test_a_provider_echoing_its_key_is_redacted_everywhere(aiohttp_server, caplog, stream):
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    echo = f"bad key {SECRET.upper()} or AZURE-SECRET-77"

    async def echoing(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body["model"] == "mid":  # an error frame after the first chunk
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(sse_chunk("Hel"))
            error = {"message": echo, "type": "x\n" + SECRET, "code": f"c\t{SECRET}"}
            await resp.write(b"data: " + json.dumps({"error": error}).encode() + b"\n\n")
            return resp
        error = {"message": echo, "param": SECRET.lower(), "type": SECRET, "code": SECRET}
        return web.json_response({"error": error}, status=400)

    gateway = await gateway_for(aiohttp_server, echoing)
    for model in ("mid", "before") if stream else ("before",):
        status, body, _ = await post(gateway, {"model": model, "messages": HI, "stream": stream})
        assert status == (200 if model == "mid" else 400)
        text = body.decode().lower()
        assert "secret" not in text and "[redacted]" in text, text
    lines = [_Formatter(json=False).format(r) for r in caplog.records if r.name == "llmgate.turn"]
    assert lines and all("secret" not in line.lower() for line in lines)
    assert all("\n" not in line for line in lines)
    assert any("error=provider_error" in line or "error=upstream_error" in line for line in lines)


async def test_a_400_digit_retry_after_is_clamped(aiohttp_server):
    async def busy(request: web.Request) -> web.Response:
        return web.json_response(
            {"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "9" * 400}
        )

    assert retry_after_s(ApiError(429, "x", headers={"Retry-After": "9" * 400}), 1) == (
        MAX_RETRY_AFTER_S
    )
    gateway = await gateway_for(
        aiohttp_server, busy, models={"voice": ["fake/a", "fake/b"]}
    )
    status, body, headers = await post(gateway, {"model": "voice", "messages": HI, "stream": True})
    assert status == 429, body
    assert int(headers["retry-after"]) <= MAX_RETRY_AFTER_S


# --- what a caller sends ------------------------------------------------------------------


@pytest.mark.parametrize("field", ["context", "response_format", "an_unknown_field"])
async def test_deep_nesting_is_a_400_with_a_request_id(gateway, upstream, field):
    deep = '{"a":' * 2000 + "1" + "}" * 2000
    body = json.dumps({"model": "text", "messages": HI, field: 0}).replace("0}", deep + "}")
    async with aiohttp.ClientSession() as s:
        url = gateway.make_url("/v1/chat/completions")
        async with s.post(url, data=body.encode(), headers=AUTH) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
            assert resp.headers["x-request-id"].startswith("req_")
    assert upstream.requests == []


async def test_an_unhandled_error_is_a_500_that_names_the_turn(gateway, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("internal detail sk-secret")

    monkeypatch.setattr("llmgate.server.handlers.build", broken)
    status, body, headers = await post(gateway, {"model": "text", "messages": HI})
    assert status == 500
    request_id = headers["x-request-id"]
    assert request_id in body.decode() and b"sk-secret" not in body
    assert any(request_id in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


async def test_an_authorization_that_is_not_utf8_is_a_401(gateway):
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer \xff\xfe\x80key\r\nContent-Length: 2\r\n\r\n{}"
    )
    assert (await head_of(reader)).startswith(b"HTTP/1.1 401")
    writer.close()


def test_a_log_line_cannot_be_forged_nor_grow_without_bound():
    turn = Turn("/chat/completions")
    turn.model = "gpt\n2026-12-03T00:00:00.000Z info turn status=200\tkey=admin\x1b[2J\u2028"
    turn.end(502, "c\nfake=1")
    turn.finish_reason = "m" * 900_000
    turn.key = "tenant\u202egnp.exe"  # a bidi override reorders what a terminal shows
    turn.usage = {f"{'k' * 70}{i}_tokens": 1 for i in range(10_000)}  # a provider's usage
    turn.usage |= {f"x{i}_tokens": 1 for i in range(10_000)}
    record = logging.LogRecord("llmgate.turn", logging.INFO, __file__, 1, "turn", (), None)
    record.turn = turn.fields()
    for fmt in (False, True):
        line = _Formatter(json=fmt).format(record)
        assert not any(c in line for c in "\n\r\t\x1b\u2028\u202e"), line
        assert len(line) < 4000
        assert "fake=1" not in line  # a provider's own code is logged as one of a known set
    message = logging.LogRecord("llmgate", logging.WARNING, __file__, 1, "at %s", ("a\nb",), None)
    assert "\n" not in _Formatter(json=False).format(message)


async def test_a_tenant_cannot_barge_in_on_another_keys_channel(make_gateway, upstream):
    keys = [{"key": "key-a", "name": "a"}, {"key": "key-b", "name": "b"}]
    gateway = await make_gateway(server={"api_keys": [], "keys": keys})
    url = gateway.make_url("/v1/chat/completions")
    async with aiohttp.ClientSession() as session:
        victim = await session.post(
            url, data=agora_body("stall-mid", 1), headers={"Authorization": "Bearer key-a"}
        )
        await victim.content.readline()  # its answer has begun
        async with session.post(
            url, data=agora_body("text", 9), headers={"Authorization": "Bearer key-b"}
        ) as other:
            assert (await other.read()).endswith(b"data: [DONE]\n\n")
        await asyncio.sleep(0.1)
        assert upstream.cancelled == 0 and upstream.open_streams == 1  # still talking
        victim.close()


async def test_a_key_uses_only_its_allowed_models(make_gateway, upstream):
    keys = [
        {"key": "key-a", "name": "a", "allowed_models": ["text"]},
        {"key": "key-b", "name": "b"},
    ]
    gateway = await make_gateway(
        server={"api_keys": [], "keys": keys}, models={"voice": ["fake/text"]}
    )
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    assert (await post(gateway, {"model": "text", "messages": HI}, a))[0] == 200
    assert (await post(gateway, {"model": "fake/text", "messages": HI}, a))[0] == 200
    for model in ("voice", "fake/other", "other"):
        status, body, _ = await post(gateway, {"model": model, "messages": HI}, a)
        assert status == 403, model
        assert json.loads(body)["error"]["code"] == "model_not_allowed"
    assert (await post(gateway, {"model": "voice", "messages": HI}, b))[0] == 200
    async with (
        aiohttp.ClientSession() as s,
        s.get(gateway.make_url("/v1/models"), headers=a) as resp,
    ):
        listed = {m["id"] for m in (await resp.json())["data"]}
    assert listed == {"fake/text"}


async def test_a_percent_encoded_path_is_no_route(gateway, upstream):
    async with aiohttp.ClientSession() as s:
        for path in ("/v1/chat%2Fcompletions", "/%6Detrics", "/v1%2Fmodels"):
            url = gateway.make_url("/").with_path(path, encoded=True)
            async with s.post(url, json={"model": "text", "messages": HI}, headers=AUTH) as r:
                assert r.status == 404, path
            async with s.get(url, headers=AUTH) as r:
                assert r.status == 404, path
        async with s.put(gateway.make_url("/v1/models"), headers=AUTH) as r:
            assert r.status == 405 and set(r.headers["Allow"].split(",")) == {"GET", "HEAD"}
    assert upstream.requests == []


async def test_headers_past_64_kb_close_the_connection(upstream):
    runner, port = await serving(gateway_config(upstream.url))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        for i in range(20):  # 160 KB of headers, never ended: ~2 MB held each before
            writer.write(b"X-Pad-%d: %s\r\n" % (i, b"a" * 8000))
        with contextlib.suppress(ConnectionResetError):  # (closed with bytes unread)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 3) == b""  # closed, not held 30 s
        assert reader.at_eof() or writer.is_closing() or reader.exception() is not None
        writer.close()
    finally:
        await runner.cleanup()


async def test_a_caller_without_a_good_key_is_not_kept_alive(upstream):
    runner, port = await serving(gateway_config(upstream.url))
    try:
        for auth in (b"", b"Authorization: Bearer wrong\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n")
            head = await head_of(reader)
            assert head.startswith(b"HTTP/1.1 401") and b"Connection: close" in head
            await asyncio.wait_for(reader.read(), 3)  # and then closed
            writer.close()
    finally:
        await runner.cleanup()


async def test_connections_past_what_the_process_holds_are_closed(upstream, monkeypatch):
    monkeypatch.setattr(serve, "max_connections", lambda: 3)
    runner, port = await serving(gateway_config(upstream.url))
    opened = []
    try:
        for _ in range(4):
            opened.append(await asyncio.open_connection("127.0.0.1", port))
        reader, _ = opened[-1]
        assert await asyncio.wait_for(reader.read(), 3) == b""  # the fourth is closed
        reader, writer = opened[0]  # the first three are served
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await head_of(reader)).startswith(b"HTTP/1.1 200")
    finally:
        for _, writer in opened:
            writer.close()
        await runner.cleanup()
