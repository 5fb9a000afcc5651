"""The official openai client against llmgate in front of a fake upstream."""

from __future__ import annotations

import json

import aiohttp
import openai
import pytest

from tests.conftest import API_KEY
from tests.fake_upstream import USAGE, WORDS, frame

MESSAGES = [{"role": "user", "content": "hi"}]
TEXT = "".join(WORDS)


async def collect(stream) -> tuple[str, list]:
    chunks = [c async for c in stream]
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


@pytest.mark.parametrize("model", ["text", "crlf", "cr", "split", "comments", "azure"])
async def test_streaming_text_in_every_framing(client, upstream, model):
    stream = await client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
    text, chunks = await collect(stream)
    assert text == TEXT
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert upstream.requests[0]["model"] == model


async def test_streaming_tool_calls_relayed_unchanged(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    stream = await client.chat.completions.create(
        model="tools", messages=MESSAGES, tools=tools, stream=True
    )
    _, chunks = await collect(stream)
    first = chunks[0].choices[0].delta.tool_calls[0]
    assert (first.index, first.id, first.function.name) == (0, "call_abc", "get_weather")
    args = "".join(c.choices[0].delta.tool_calls[0].function.arguments for c in chunks[:-1])
    assert json.loads(args) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_usage_chunk_with_include_usage(client, upstream):
    stream = await client.chat.completions.create(
        model="text", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    text, chunks = await collect(stream)
    assert text == TEXT
    assert chunks[-1].choices == []
    assert chunks[-1].usage.total_tokens == USAGE["total_tokens"]
    assert upstream.requests[0]["stream_options"] == {"include_usage": True}


async def test_non_streaming(client):
    completion = await client.chat.completions.create(model="text", messages=MESSAGES)
    assert completion.choices[0].message.content == TEXT
    assert completion.usage.prompt_tokens == USAGE["prompt_tokens"]


async def test_provider_prefix_picks_provider_and_is_stripped(client, upstream):
    await client.chat.completions.create(model="fake/text", messages=MESSAGES)
    assert upstream.requests[0]["model"] == "text"


@pytest.mark.parametrize("model", ["error-mid", "garbage", "truncated", "drop"])
async def test_failure_after_first_byte_raises_api_error(client, model):
    stream = await client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
    seen = []
    with pytest.raises(openai.APIError):
        async for c in stream:
            seen.append(c)
    assert seen, "the chunks before the failure arrive"


async def test_stream_closed_after_finish_reason_gets_done(gateway, upstream):
    # The fake closes after its finish_reason chunk without [DONE]: llmgate adds it.
    sent = b"".join(frame(c) for c in upstream.script("no-done", {}))
    assert await raw_stream(gateway, "no-done") == sent + b"data: [DONE]\n\n"


async def test_done_without_a_finish_reason_is_a_failure(gateway, upstream):
    raw = await raw_stream(gateway, "done-no-finish")
    assert b"[DONE]" not in raw
    sent = b"".join(frame(c) for c in upstream.script("done-no-finish", {}))
    assert raw.startswith(sent)  # what came in the same read as [DONE] is not lost
    error = json.loads(raw.split(b"\n\n")[-2][6:])["error"]
    assert error["code"] == "upstream_error" and "before finishing" in error["message"]


async def test_bad_request_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="text", messages=[{"role": "robot"}])
    assert info.value.body["param"] == "$.messages[0].role"


async def test_wrong_key_is_401(gateway, connect):
    with pytest.raises(openai.AuthenticationError):
        await connect(gateway, "nope").chat.completions.create(model="text", messages=MESSAGES)


async def test_body_over_limit_is_413(make_gateway, connect):
    gw = await make_gateway(server={"max_body_mb": 0.01})
    big = [{"role": "user", "content": "x" * 20_000}]
    with pytest.raises(openai.APIStatusError) as info:
        await connect(gw).chat.completions.create(model="text", messages=big)
    assert info.value.status_code == 413
    assert info.value.body["code"] == "request_too_large"


async def test_upstream_429_keeps_status_and_retry_after(client):
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="status-429", messages=MESSAGES, stream=True)
    assert info.value.response.headers["retry-after"] == "7"
    assert "fake error 429" in info.value.message


async def test_upstream_500_is_502(client):
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="status-500", messages=MESSAGES)
    assert info.value.status_code == 502
    assert info.value.body["code"] == "upstream_error"


async def test_models_lists_provider_models(client):
    models = await client.models.list()
    assert [m.id for m in models.data] == ["fake/text"]


async def raw_stream(gateway, model: str, path: str = "/v1/chat/completions") -> bytes:
    body = {"model": model, "stream": True, "messages": MESSAGES}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = gateway.make_url(path)
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as resp,
    ):
        assert resp.status == 200
        return await resp.read()


async def test_payloads_are_relayed_byte_for_byte(gateway, upstream):
    # The fake encodes with json.dumps' ", " and ": " separators: any re-encoding would show.
    sent = b"".join(frame(c) for c in upstream.script("text", {})) + b"data: [DONE]\n\n"
    assert await raw_stream(gateway, "text") == sent


async def test_multi_line_data_comments_and_event_fields(gateway):
    raw = await raw_stream(gateway, "comments")
    first = raw.split(b"\n\n")[0]
    assert first.count(b"data: ") == 2  # a payload over two data: lines stays two lines
    assert b"keep-alive" not in raw and b"event:" not in raw and b"retry:" not in raw
    assert raw.endswith(b"data: [DONE]\n\n")
