"""A speech route (`speech = true`) through the openai client: speakable text, faithful chunks."""

from __future__ import annotations

import asyncio
import json
import logging

import openai
import pytest
from aiohttp import web

from llmgate.stages import speech
from tests import fake_upstream
from tests import test_functional as functional
from tests.fake_upstream import SPOKEN, USAGE, frame

MESSAGES = [{"role": "user", "content": "hi"}]
SPEECH = {"path": "/speech/chat/completions", "speech": True}


@pytest.fixture
async def speech_gateway(make_gateway):
    return await make_gateway(routes=[{"path": "/chat/completions"}, SPEECH])


def speech_client(connect, gateway):
    client = connect(gateway)
    return client.with_options(base_url=str(gateway.make_url("/speech")))


async def raw_stream(gateway, model: str, path: str = "/speech/chat/completions") -> bytes:
    return await functional.raw_stream(gateway, model, path)


def payloads(raw: bytes) -> list[dict]:
    frames = [f for f in raw.split(b"\n\n") if f.startswith(b"data: ")]
    assert frames[-1] == b"data: [DONE]"
    return [json.loads(f[6:]) for f in frames[:-1]]


async def test_streamed_answer_is_speakable(speech_gateway, connect):
    client = speech_client(connect, speech_gateway)
    stream = await client.chat.completions.create(model="markdown", messages=MESSAGES, stream=True)
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == SPOKEN
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert all(d.strip() for d in deltas)  # no delta of bare whitespace


async def test_rewritten_chunks_keep_every_other_field(speech_gateway, upstream):
    sent = [json.loads(f[6:]) for f in (frame(c) for c in upstream.script("markdown", {}))]
    got = payloads(await raw_stream(speech_gateway, "markdown"))
    for chunk in got:
        assert chunk["id"] == "chatcmpl-fake" and chunk["created"] == sent[0]["created"]
        assert chunk["model"] == "markdown" and chunk["system_fingerprint"] == "fp_fake"
        assert chunk["x_vendor"] == {"queue_ms": 3}
        assert chunk["choices"][0]["logprobs"] is None
    assert len(got) < len(sent)  # deltas of nothing but markup are not sent


async def test_chunks_without_markup_go_on_byte_for_byte(speech_gateway):
    plain = (await raw_stream(speech_gateway, "text", "/v1/chat/completions")).split(b"\n\n")
    spoken = (await raw_stream(speech_gateway, "text")).split(b"\n\n")
    assert spoken[:3] == plain[:3]  # the role chunk, "Hello", " there": as they came
    # ", héllo 👋" loses its emoji; the "!" after it waits one chunk (it might open "![")
    rewritten = [json.loads(f[6:]) for f in spoken[3:5]]
    assert [c["choices"][0]["delta"].get("content") for c in rewritten] == [", h\u00e9llo", "!"]
    assert rewritten[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("model", ["tools", "content-parts"])
async def test_what_is_not_text_passes_unchanged(speech_gateway, model):
    plain = await raw_stream(speech_gateway, model, "/v1/chat/completions")
    assert await raw_stream(speech_gateway, model) == plain


async def test_last_text_in_the_finishing_chunk(speech_gateway, connect):
    client = speech_client(connect, speech_gateway)
    stream = await client.chat.completions.create(
        model="finish-with-content", messages=MESSAGES, stream=True
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hi there"
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_non_streamed_answer_is_collected_and_speakable(speech_gateway, connect, upstream):
    client = speech_client(connect, speech_gateway)
    completion = await client.chat.completions.create(model="markdown", messages=MESSAGES)
    assert completion.object == "chat.completion"
    assert completion.id == "chatcmpl-fake" and completion.model == "markdown"
    assert completion.choices[0].message.content == SPOKEN
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens == USAGE["total_tokens"]
    assert completion.system_fingerprint == "fp_fake"
    sent = upstream.requests[0]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


async def test_non_streamed_tool_calls_are_assembled(speech_gateway, connect):
    client = speech_client(connect, speech_gateway)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    completion = await client.chat.completions.create(
        model="tools", messages=MESSAGES, tools=tools
    )
    message = completion.choices[0].message
    assert message.content is None
    [call] = message.tool_calls
    assert (call.id, call.function.name) == ("call_abc", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert completion.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("model", ["truncated", "done-no-finish"])
async def test_non_streamed_answer_cut_off_is_502(speech_gateway, connect, model):
    with pytest.raises(openai.APIStatusError) as info:
        await speech_client(connect, speech_gateway).chat.completions.create(
            model=model, messages=MESSAGES
        )
    assert info.value.status_code == 502


async def test_speech_options_table(make_gateway, connect):
    route = {"path": "/speech/chat/completions", "speech": {"urls": "domain", "emoji": False}}
    gw = await make_gateway(routes=[route])
    client = speech_client(connect, gw)
    stream = await client.chat.completions.create(model="markdown", messages=MESSAGES, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hello there! See the docs \U0001f44b\nNext\none"


async def test_the_turn_line_notes_what_speech_removed(speech_gateway, caplog):
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    await raw_stream(speech_gateway, "markdown")
    [line] = [r.turn for r in caplog.records if r.name == "llmgate.turn"]
    assert line["speech"]["dropped_chars"] > 0
    assert line["status"] == 200 and line["finish_reason"] == "stop"


async def test_a_bug_in_a_stage_after_the_headers_ends_the_stream_with_an_error(
    speech_gateway, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    real, seen = speech._spoken, []

    def failing(piece, texts, options):
        seen.append(piece)
        if len(seen) == 3:
            raise RuntimeError("a bug with a secret sk-abc in its text")
        return real(piece, texts, options)

    monkeypatch.setattr(speech, "_spoken", failing)
    raw = await raw_stream(speech_gateway, "markdown")
    assert b"HTTP/1.1" not in raw and b"[DONE]" not in raw and b"sk-abc" not in raw
    error = json.loads(raw.split(b"\n\n")[-2][6:])["error"]
    assert error["code"] == "internal_error" and error["type"] == "api_error"
    [line] = [r.turn for r in caplog.records if r.name == "llmgate.turn"]
    assert line["status"] == 500


HUGE = "**Bold** words and [a link](https://x.example/a) here. " * 40_000  # 2.2 MB


async def test_a_huge_delta_is_spoken_without_holding_the_event_loop(make_gateway, aiohttp_server):
    # A broken or hostile provider's one content delta of megabytes: cleaned a slice at a
    # time, so the other calls on this process (here: a ticker) still get their turn.
    async def answer(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(frame(fake_upstream.chunk("huge", {"role": "assistant", "content": HUGE})))
        await resp.write(frame(fake_upstream.chunk("huge", {}, "stop")) + b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    provider = await aiohttp_server(app)
    gateway = await make_gateway(
        providers={"fake": {"base_url": str(provider.make_url("/v1"))}}, routes=[SPEECH]
    )
    loop = asyncio.get_running_loop()
    gaps: list[float] = []

    async def tick() -> None:
        last = loop.time()
        while True:
            await asyncio.sleep(0.005)
            gaps.append(loop.time() - last)
            last = loop.time()

    ticker = asyncio.ensure_future(tick())
    try:
        got = payloads(await raw_stream(gateway, "huge"))
    finally:
        ticker.cancel()
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in got)
    assert text.count("Bold words and a link here.") == 40_000
    assert "*" not in text and "https" not in text
    assert got[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["id"] == "chatcmpl-fake" and c["model"] == "huge" for c in got)
    assert got[-1]["choices"][0]["finish_reason"] == "stop"
    # a slice is about 10 ms of work; the whole delta at once held the loop for seconds
    assert max(gaps) < 0.5, max(gaps)
