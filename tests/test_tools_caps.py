"""The cap on the calls of llmgate's own tools run in one round: a model asking for 500 at
once gets 16 run and the rest answered unrun."""

from __future__ import annotations

import json
import logging

import aiohttp
import pytest
from aiohttp import web

from llmgate.stages.tools import MAX_CALLS_PER_ROUND
from tests.conftest import API_KEY, stream_chunks

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
MESSAGES = [{"role": "user", "content": "weather in Paris?"}]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.fixture
async def weather(aiohttp_server) -> tuple[str, list[dict]]:
    """An HTTP tool endpoint that counts its calls."""
    calls: list[dict] = []

    async def handle(request: web.Request) -> web.Response:
        calls.append(await request.json())
        return web.json_response({"sky": "sunny"})

    app = web.Application()
    app.router.add_post("/weather", handle)
    server = await aiohttp_server(app)
    return str(server.make_url("/weather")), calls


async def post(gateway, model: str) -> tuple[int, bytes]:
    body = {"model": model, "stream": True, "messages": MESSAGES}
    url = gateway.make_url("/tools/chat/completions")
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=HEADERS) as r:
        return r.status, await r.read()


async def test_a_round_of_500_calls_runs_only_the_cap_and_answers_the_rest(
    make_gateway, upstream, weather, caplog
):
    url, calls = weather
    gateway = await make_gateway(
        providers={"fake": {"base_url": upstream.url, "idle_timeout_s": 30}},
        tools={"weather": {"kind": "http", "url": url, "parameters": CITY}},
        routes=[{"path": "/tools/chat/completions", "tools": ["weather"]}],
    )
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    status, raw = await post(gateway, "use-tools-" + "+".join(["weather"] * 500))
    chunks = stream_chunks(raw)
    assert status == 200 and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert len(calls) == MAX_CALLS_PER_ROUND == 16
    # The conversation stays valid for the provider: every call of the assistant message
    # has exactly one tool message, in order; the ones past the cap say why they did not run.
    messages = upstream.requests[1]["messages"]
    [assistant] = [m for m in messages if m.get("tool_calls")]
    ids = [c["id"] for c in assistant["tool_calls"]]
    results = [m for m in messages if m["role"] == "tool"]
    assert len(ids) == 500 and [m["tool_call_id"] for m in results] == ids
    ran, skipped = results[:16], results[16:]
    assert all(json.loads(m["content"]) == {"sky": "sunny"} for m in ran)
    assert {m["content"] for m in skipped} == {
        "error: not run: at most 16 tool calls run in one round; call it again if still needed"
    }
    [turn] = [r.turn for r in caplog.records if r.name == "llmgate.turn"]
    assert len(turn["tools"]["calls"]) == 16 and turn["tools"]["not_run"] == 484


async def test_a_routes_max_tool_calls_sets_the_cap(make_gateway, upstream, weather):
    url, calls = weather
    gateway = await make_gateway(
        providers={"fake": {"base_url": upstream.url, "idle_timeout_s": 30}},
        tools={"weather": {"kind": "http", "url": url, "parameters": CITY}},
        routes=[{"path": "/tools/chat/completions", "tools": ["weather"], "max_tool_calls": 3}],
    )
    status, _ = await post(gateway, "use-tools-" + "+".join(["weather"] * 10))
    assert status == 200 and len(calls) == 3
