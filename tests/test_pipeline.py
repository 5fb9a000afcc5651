"""The seam: a stage composed around the provider's call, as the next stages will be."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing

import aiohttp
import pytest

from llmgate.app import LIVE, create_app
from llmgate.config import parse
from llmgate.pipeline import OPENED, Ask, Call, Opened, Piece, compose
from llmgate.server.handlers import ChatCompletions
from llmgate.upstream.failover import provider_call
from tests.conftest import API_KEY, gateway_config

WAITING = {
    "id": "chatcmpl-wait",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": "llmgate",
    "choices": [{"index": 0, "delta": {"role": "assistant", "content": "One moment."}}],
}


class Waiting:
    """Says something before the provider has answered (RAG's waiting message)."""

    def wrap(self, inner: Call) -> Call:
        async def call(ask: Ask) -> AsyncIterator[Piece | Opened]:
            ask.body["messages"].append({"role": "system", "content": "added by a stage"})
            yield Piece.of(WAITING)
            async with aclosing(inner(ask)) as items:
                async for item in items:
                    if item is not OPENED:
                        yield item

        return call


@pytest.fixture
async def waiting_gateway(aiohttp_server, upstream):
    raw = gateway_config(upstream.url)
    raw["providers"]["fake"]["first_token_timeout_s"] = 0.5
    app = create_app(parse(raw, {}))
    generation = app[LIVE].current
    call = compose(provider_call, [Waiting()])
    route = ChatCompletions("/waiting", call, generation.settings, generation.router)
    generation.routes["/waiting/chat/completions"] = ("POST", route.handle)
    return await aiohttp_server(app)


async def frames_of(gateway, model: str) -> list[bytes]:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = gateway.make_url("/waiting/chat/completions")
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        return [first, *(await resp.read()).split(b"\n\n")[:-1]]


async def test_a_stage_sees_the_body_as_a_dict_and_speaks_first(waiting_gateway, upstream):
    frames = await frames_of(waiting_gateway, "text")
    assert json.loads(frames[0][6:].strip())["choices"][0]["delta"]["content"] == "One moment."
    assert frames[-1] == b"data: [DONE]"
    assert upstream.requests[0]["messages"][-1] == {"role": "system", "content": "added by a stage"}


async def test_what_a_stage_says_first_goes_out_before_the_providers_answer(waiting_gateway):
    # The provider sends no headers in time: the caller has heard the waiting message
    # already, and the timeout is an error frame after it, not a 504.
    frames = await frames_of(waiting_gateway, "slow-headers")
    assert b"One moment." in frames[0]
    assert json.loads(frames[-1][6:])["error"]["code"] == "upstream_timeout"
