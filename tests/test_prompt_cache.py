"""prompt_cache_key by channel, and the cached prompt tokens a provider reports."""

from __future__ import annotations

import json
import logging

import pytest
from aiohttp import web

from tests.conftest import API_KEY, stream_chunks
from tests.test_metrics import delta, scrape

USAGE = {"prompt_tokens": 1200, "completion_tokens": 5, "total_tokens": 1205,
         "prompt_tokens_details": {"cached_tokens": 1024}}


class CachingUpstream:
    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        chunks = [
            {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi."},
                                  "finish_reason": None}]},
            {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {**head, "choices": [], "usage": USAGE},
        ]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in chunks:
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def caching(aiohttp_server, make_gateway):
    async def make(**provider):
        upstream = CachingUpstream()
        server = await aiohttp_server(upstream.app)
        gateway = await make_gateway(
            providers={"up": {"base_url": str(server.make_url("/v1")), **provider}},
            server={"metrics": True},
        )
        return upstream, gateway

    return make


async def post(gateway, **extra) -> bytes:
    import aiohttp

    message = {"role": "user", "content": "hi", "turn_id": 2, "timestamp": 1}
    body = {"model": "m", "stream": True, "messages": [message],
            "context": {"appId": "app-1", "channel": "room-42"}, **extra}
    async with aiohttp.ClientSession() as session, session.post(
        gateway.make_url("/v1/chat/completions"), json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as resp:
        return await resp.read()


async def test_a_channel_hash_as_prompt_cache_key_when_asked(caching):
    upstream, gateway = await caching(prompt_cache_key="channel")
    await post(gateway)
    await post(gateway)
    keys = [b.get("prompt_cache_key") for b in upstream.bodies]
    assert keys[0] is not None and keys[0] == keys[1]  # stable across a call's turns
    assert "room-42" not in keys[0] and "app-1" not in keys[0]  # never the raw names
    await post(gateway, prompt_cache_key="callers-own")
    assert upstream.bodies[-1]["prompt_cache_key"] == "callers-own"


async def test_no_prompt_cache_key_by_default(caching):
    upstream, gateway = await caching()
    await post(gateway)
    assert "prompt_cache_key" not in upstream.bodies[0]


async def test_cached_tokens_in_the_log_line_and_metrics(caching, caplog):
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    _, gateway = await caching()
    before = await scrape(gateway)
    raw = await post(gateway)
    assert stream_chunks(raw)[-1]["usage"] == USAGE  # passed on as the provider sent it
    [line] = [r.turn for r in caplog.records if r.name == "llmgate.turn"]
    assert line["cached_tokens"] == 1024
    assert line["metadata"]["context"]["channel"] == "room-42" and line["metadata"]["turn_id"] == 2
    after = await scrape(gateway)
    assert delta(before, after, "llmgate_tokens_total", provider="up", kind="cached_prompt") == 1024
    assert delta(before, after, "llmgate_tokens_total", provider="up", kind="prompt") == 1200
