"""Provider failures before and after the first byte, and timeouts: clear errors, no hangs."""

from __future__ import annotations

import asyncio
import logging
import socket

import aiohttp
import openai
import pytest

from tests.conftest import API_KEY, eventually

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("model", "status"), [("status-400", 400), ("status-404", 404)])
async def test_upstream_4xx_keeps_status_and_detail(client, model, status):
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model=model, messages=HI, stream=True)
    assert info.value.status_code == status
    assert info.value.body["code"] == "fake_code"
    assert info.value.body["param"] == "messages"


async def test_upstream_401_names_the_config_key_and_leaks_nothing(client):
    with pytest.raises(openai.AuthenticationError) as info:
        await client.chat.completions.create(model="status-401", messages=HI)
    message = info.value.body["message"]
    assert "providers.fake.api_key" in message
    assert "sk-" not in message and "upstream-secret" not in message


async def test_unset_variable_is_503_naming_it(connect, make_gateway, upstream):
    raw_provider = {"base_url": upstream.url, "api_key": "${FAKE_KEY}"}
    gw = await make_gateway(providers={"fake": raw_provider})
    with pytest.raises(openai.APIStatusError) as info:
        await connect(gw).chat.completions.create(model="text", messages=HI)
    assert info.value.status_code == 503
    assert "FAKE_KEY" in info.value.body["message"]
    assert upstream.requests == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_refused_connection_is_502_with_request_id(connect, make_gateway):
    url = f"http://127.0.0.1:{free_port()}/v1"
    gw = await make_gateway(providers={"fake": {"base_url": url}})
    with pytest.raises(openai.APIStatusError) as info:
        await connect(gw).chat.completions.create(model="text", messages=HI, stream=True)
    assert info.value.status_code == 502
    request_id = info.value.response.headers["X-Request-Id"]
    assert request_id in info.value.body["message"]
    assert "Errno" not in info.value.body["message"]


async def test_no_headers_in_time_is_504(connect, make_gateway, upstream):
    gw = await make_gateway(
        providers={"fake": {"base_url": upstream.url, "first_token_timeout_s": 0.2}}
    )
    for stream in (True, False):
        with pytest.raises(openai.APIStatusError) as info:
            await connect(gw).chat.completions.create(
                model="slow-headers", messages=HI, stream=stream
            )
        assert info.value.status_code == 504
        assert info.value.body["code"] == "upstream_timeout"


@pytest.mark.parametrize("model", ["stall", "pings"])
async def test_no_first_token_after_headers_ends_in_error_frame(
    connect, make_gateway, upstream, model
):
    gw = await make_gateway(
        providers={"fake": {"base_url": upstream.url, "first_token_timeout_s": 0.2}}
    )
    stream = await connect(gw).chat.completions.create(model=model, messages=HI, stream=True)
    with pytest.raises(openai.APIError) as info:
        async for _ in stream:
            pass
    assert info.value.body["code"] == "upstream_timeout"
    await eventually(lambda: upstream.cancelled == 1)


async def test_silent_upstream_mid_stream_hits_idle_timeout(connect, make_gateway, upstream):
    gw = await make_gateway(providers={"fake": {"base_url": upstream.url, "idle_timeout_s": 0.2}})
    stream = await connect(gw).chat.completions.create(model="stall-mid", messages=HI, stream=True)
    seen = []
    with pytest.raises(openai.APIError) as info:
        async for c in stream:
            seen.append(c)
    assert len(seen) == 2
    assert info.value.body["code"] == "upstream_timeout"


async def test_malformed_non_streamed_answer_is_502(client):
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="garbage", messages=HI)
    assert info.value.status_code == 502


async def test_keepalive_comments_flow_while_the_first_token_is_awaited(make_gateway, upstream):
    gw = await make_gateway(
        server={"keepalive_s": 0.05},
        providers={"fake": {"base_url": upstream.url, "first_token_timeout_s": 0.5}},
    )
    body = {"model": "stall", "stream": True, "messages": HI}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession() as session:
        url = gw.make_url("/v1/chat/completions")
        async with session.post(url, json=body, headers=headers) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            assert resp.headers["Cache-Control"] == "no-cache"
            assert resp.headers["X-Accel-Buffering"] == "no"
            raw = await resp.read()
    assert raw.startswith(b": ping\n\n")
    assert raw.rstrip().endswith(b"}")  # the timeout's error frame, and no [DONE]
    assert b"[DONE]" not in raw and b"upstream_timeout" in raw


# json-cut / json-reset: JSON to a stream request, cut off mid-body (by a close, by a reset)
@pytest.mark.parametrize("model", ["json-when-streamed", "status-503", "json-cut", "json-reset"])
async def test_stream_asked_but_no_stream_given_is_502(client, model):
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model=model, messages=HI, stream=True)
    assert info.value.status_code == 502
    assert info.value.body["type"] == "api_error"
    assert info.value.body["code"] == "upstream_error"


@pytest.mark.parametrize("stream", [True, False])
async def test_error_envelope_with_status_200_is_502_with_its_message(client, stream):
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="error-200", messages=HI, stream=stream)
    assert info.value.status_code == 502
    assert "quota exceeded" in info.value.body["message"]
    assert "sk-abcdef" not in info.value.body["message"]


async def test_a_caller_slow_to_read_is_not_a_silent_provider(make_gateway, upstream):
    gw = await make_gateway(providers={"fake": {"base_url": upstream.url, "idle_timeout_s": 0.2}})
    body = {"model": "flood", "stream": True, "messages": HI}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession() as session:
        url = gw.make_url("/v1/chat/completions")
        async with session.post(url, json=body, headers=headers) as resp:
            await resp.content.readline()
            await asyncio.sleep(1)  # buffers fill; llmgate waits on us, not on the provider
            raw = await resp.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    assert b"upstream_timeout" not in raw


async def test_a_page_that_is_no_event_stream_is_502_before_our_headers(client):
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="html", messages=HI, stream=True)
    assert info.value.status_code == 502
    assert "text/html" in info.value.body["message"]
    assert "base_url" in info.value.body["message"]


@pytest.mark.parametrize(
    ("model", "stream"),
    [("reset", True), ("reset-at-once", True), ("reset-at-once", False), ("json-reset", True)],
)
async def test_an_upstream_reset_is_the_providers_failure_not_the_callers(
    client, caplog, model, stream
):
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    with pytest.raises(openai.APIError) as info:
        answer = await client.chat.completions.create(model=model, messages=HI, stream=stream)
        async for _ in answer:
            pass
    assert info.value.body["code"] == "upstream_error"
    await eventually(lambda: any(r.name == "llmgate.turn" for r in caplog.records))
    [line] = [r.turn for r in caplog.records if r.name == "llmgate.turn"]
    assert line["status"] == 502 and line["error"] == "upstream_error"
