"""A staged route sends the chunks of one provider read in one write, as the plain route
does; and a stage that drops a read's last chunk holds nothing back."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from llmgate.server import stream
from tests.conftest import API_KEY

HEAD = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def frame(delta: dict | None = None, finish: str | None = None, usage: dict | None = None):
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    chunk = {**HEAD, "choices": choices, **({"usage": usage} if usage else {})}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class Upstream:
    """Two reads: the first ends in a usage-only chunk (the tools stage drops it, to send
    one summed usage at the end); the second waits until the test lets it go."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        words = [frame({"role": "assistant", "content": ""}), frame({"content": "Hello"}),
                 frame({"content": " there."})]
        if body["model"] == "one-read":
            await resp.write(b"".join([*words, frame({}, "stop"), b"data: [DONE]\n\n"]))
            return resp
        await resp.write(b"".join([*words, frame(usage={"prompt_tokens": 1})]))
        await self.gate.wait()
        await resp.write(frame({}, "stop") + b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def staged(aiohttp_server, make_gateway):
    upstream = Upstream()
    server = await aiohttp_server(upstream.app)
    gateway = await make_gateway(
        providers={"up": {"base_url": str(server.make_url("/v1"))}},
        tools={"lookup": {"kind": "http", "url": "http://127.0.0.1:9/lookup"}},
        routes=[{"path": "/tools/chat/completions", "tools": ["lookup"]}],
    )
    return upstream, gateway


def post(session, gateway, model: str):
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    return session.post(
        gateway.make_url("/tools/chat/completions"), json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
    )


async def test_one_read_is_one_write(staged, monkeypatch):
    _, gateway = staged
    writes: list[bytes] = []
    real_write, real_eof = stream.SSEResponse.write, stream.SSEResponse.write_eof

    async def write(self, data):
        writes.append(data)
        await real_write(self, data)

    async def write_eof(self, data=b""):
        writes.append(data)
        await real_eof(self, data)

    monkeypatch.setattr(stream.SSEResponse, "write", write)
    monkeypatch.setattr(stream.SSEResponse, "write_eof", write_eof)
    async with aiohttp.ClientSession() as session, post(session, gateway, "one-read") as resp:
        raw = await resp.read()
    assert raw.count(b"data: ") == 5
    assert raw.endswith(b"data: [DONE]\n\n")
    # the role, two words, the finish and [DONE]: one write
    assert [w for w in writes if w] == [raw]


async def test_a_dropped_last_chunk_holds_nothing_back(staged):
    upstream, gateway = staged
    async with aiohttp.ClientSession() as session, post(session, gateway, "held") as resp:
        seen = b""
        async with asyncio.timeout(5):  # (held back, it would come only after the gate)
            while b" there." not in seen:
                seen += await resp.content.readany()
        upstream.gate.set()
        rest = await resp.read()
    assert (seen + rest).endswith(b"data: [DONE]\n\n")


class _Counting:
    def __init__(self, decoder, seen: list[bytes]) -> None:
        self._decoder, self._seen = decoder, seen

    def decode(self, data):
        self._seen.append(bytes(data))
        return self._decoder.decode(data)


async def test_a_chunk_is_decoded_once_on_an_audio_and_speech_route(
    make_gateway, upstream, monkeypatch
):
    """What a stage made is not decoded again by the next (a chunk was decoded up to four
    times on its way through speech and audio), and an audio frame not at all."""
    import llmgate.pipeline
    import llmgate.stages.audio
    import llmgate.stages.speech
    import llmgate.upstream.call

    seen: list[bytes] = []
    for module in (llmgate.pipeline, llmgate.stages.audio, llmgate.stages.speech,
                   llmgate.upstream.call):
        for name in ("generic_decoder", "view_decoder"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, _Counting(getattr(module, name), seen))
    gateway = await make_gateway(
        audio={"voice": {"engine": "piper", "pace": False}},
        routes=[{"path": "/voice/chat/completions", "audio": "voice", "speech": True}],
    )
    body = {"model": "markdown", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session, session.post(
        gateway.make_url("/voice/chat/completions"), json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as resp:
        raw = await resp.read()
    assert raw.count(b'"data":') > 10  # it spoke
    provider = [d for d in seen if d.startswith(b'{"id": "chatcmpl-fake"')]
    chunks = len(upstream_chunks := set(provider))
    assert chunks > 5 and upstream_chunks
    assert len(seen) <= 2 * chunks, len(seen)  # its view, and at most one dict for stages
    assert set(seen) == upstream_chunks  # nothing a stage made is parsed again


def _piece(n: int, more: bool):
    from llmgate.pipeline import Piece

    piece = Piece(b"data: %d\n\n" % n, b"%d" % n, None)
    piece.more = more
    return piece


async def test_held_writes_keep_their_order_for_a_slow_caller():
    """Two reads whose last chunk a stage dropped, the caller slow to take each write, then
    a read of two chunks: they reach the caller in the order they came."""

    async def items():
        yield _piece(1, True)
        await asyncio.sleep(0)  # the turn waits: 1 goes out on its own, slowly
        yield _piece(2, True)
        await asyncio.sleep(0)
        yield _piece(3, True)
        yield _piece(4, False)

    out: list[bytes] = []

    async def write(data: bytes) -> None:
        out.append(data)  # (the transport takes it at once, then the drain waits)
        await asyncio.sleep(0.01)

    staged = stream.Staged(items())
    await staged.open()
    rest = await staged.relay(write)
    await staged.aclose()
    assert b"".join([*out, rest]) == b"".join(b"data: %d\n\n" % n for n in (1, 2, 3, 4))


async def test_a_failure_after_a_held_read_sends_that_read_first():
    from llmgate.errors import UpstreamUnavailable

    async def items():
        yield _piece(1, True)
        yield _piece(2, False)  # a read of two: together
        yield _piece(3, True)  # the next read's first chunk, held ...
        raise UpstreamUnavailable("reset")  # ... when the next read fails at once

    out: list[bytes] = []

    async def write(data: bytes) -> None:
        out.append(data)

    staged = stream.Staged(items())
    await staged.open()
    with pytest.raises(UpstreamUnavailable):
        await staged.relay(write)
    await staged.aclose()
    assert out == [b"data: 1\n\ndata: 2\n\n", b"data: 3\n\n"]
