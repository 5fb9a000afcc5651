"""The turn's clock: asked for with X-Llmgate-Timing, absent (byte for byte) without."""

from __future__ import annotations

import json
import time

import aiohttp

from tests.conftest import API_KEY
from tests.test_rag import kb_path  # noqa: F401 (fixture)

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
TIMING = {**HEADERS, "X-Llmgate-Timing": "1"}
QUESTION = [{"role": "user", "content": "Do you ship to Canada?"}]


async def raw_post(url, payload: dict, headers: dict) -> tuple[aiohttp.ClientResponse, bytes]:
    async with aiohttp.ClientSession() as session, session.post(
        url, json=payload, headers=headers
    ) as resp:
        return resp, await resp.read()


def timing_of(raw: bytes) -> dict:
    [line] = [x for x in raw.split(b"\n\n") if x.startswith(b": llmgate-timing ")]
    assert raw.index(line) < raw.index(b"data: [DONE]")  # just before it
    return json.loads(line.removeprefix(b": llmgate-timing "))


async def test_without_the_header_the_plain_route_sends_the_providers_bytes(gateway, upstream):
    payload = {"model": "text", "stream": True, "messages": QUESTION}
    _, direct = await raw_post(upstream.url + "/chat/completions", payload, HEADERS)
    _, through = await raw_post(gateway.make_url("/v1/chat/completions"), payload, HEADERS)
    assert through == direct and b"llmgate-timing" not in through


async def test_a_streamed_turns_clock_is_ordered_and_within_its_wall_time(gateway, connect):
    payload = {"model": "text", "stream": True, "messages": QUESTION}
    started = time.perf_counter()
    resp, raw = await raw_post(gateway.make_url("/v1/chat/completions"), payload, TIMING)
    wall_ms = (time.perf_counter() - started) * 1000
    marks = timing_of(raw)
    assert marks["request_id"] == resp.headers["X-Request-Id"]
    assert 0 <= marks["admitted"] <= marks["first_token"] <= marks["done"] <= wall_ms
    assert marks["llm_ttft"] == marks["first_token"]
    [attempt] = marks["attempts"]
    assert attempt["target"] == "fake/text" and attempt["outcome"] == "won"
    assert marks["admitted"] <= attempt["first_token"] <= marks["first_token"]
    # every SSE client skips the comment: the openai SDK reads the answer as ever
    stream = await connect(gateway).chat.completions.create(
        model="text", messages=QUESTION, stream=True, extra_headers={"X-Llmgate-Timing": "1"}
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.startswith("Hello")


async def test_a_non_streamed_turns_clock_is_a_server_timing_header(gateway, connect):
    raw = await connect(gateway).chat.completions.with_raw_response.create(
        model="text", messages=QUESTION, extra_headers={"X-Llmgate-Timing": "1"}
    )
    marks = dict(
        (part.split(";dur=")[0].strip(), float(part.split(";dur=")[1]))
        for part in raw.headers["Server-Timing"].split(",")
    )
    assert 0 <= marks["admitted"] <= marks["first_token"] <= marks["done"]
    assert raw.parse().choices[0].message.content.startswith("Hello")
    plain = await connect(gateway).chat.completions.with_raw_response.create(
        model="text", messages=QUESTION
    )
    assert "Server-Timing" not in plain.headers


async def test_rag_and_speech_marks_in_their_order(make_gateway, kb_path):  # noqa: F811
    gateway = await make_gateway(
        kb={"shop": {"path": str(kb_path)}},
        rag={"shop": {"kb": "shop"}},
        routes=[{"path": "/voice/chat/completions", "rag": "shop", "speech": True}],
    )
    payload = {"model": "text", "stream": True, "messages": QUESTION}
    started = time.perf_counter()
    _, raw = await raw_post(gateway.make_url("/voice/chat/completions"), payload, TIMING)
    wall_ms = (time.perf_counter() - started) * 1000
    marks = timing_of(raw)
    retrieval = marks["retrieval"]
    assert retrieval["passages"] > 0
    assert marks["admitted"] <= retrieval["start"] <= retrieval["end"]
    assert marks["admitted"] <= marks["waiting_phrase"] <= marks["first_token"]
    assert marks["first_token"] <= marks["first_sentence"] <= marks["done"] <= wall_ms
    assert marks["llm_ftfs"] == round(marks["first_sentence"] - marks["first_token"], 2)
    assert marks["first_audio"] is None and marks["llm_ttfa"] is None
    assert b"Do you ship" not in raw.split(b": llmgate-timing")[1]  # no message text


async def test_an_audio_turns_clock_and_its_first_sentence_metric(make_gateway):
    from tests.test_metrics import delta, scrape

    gateway = await make_gateway(
        audio={"voice": {"engine": "piper", "pace": False}},
        routes=[{"path": "/audio/chat/completions", "audio": "voice"}],
    )
    before = await scrape(gateway)
    payload = {"model": "text", "stream": True, "messages": QUESTION}
    _, raw = await raw_post(gateway.make_url("/audio/chat/completions"), payload, TIMING)
    marks = timing_of(raw)
    assert marks["admitted"] <= marks["first_token"] <= marks["first_sentence"]
    assert marks["first_sentence"] <= marks["first_audio"] <= marks["done"]
    assert marks["llm_ttfa"] == marks["first_audio"]
    after = await scrape(gateway)
    assert delta(before, after, "llmgate_time_to_first_sentence_seconds_count",
                 route="/audio/chat/completions") == 1


async def test_the_upstream_attempt_has_its_start_status_and_first_token(gateway):
    payload = {"model": "text", "stream": True, "messages": QUESTION}
    _, raw = await raw_post(gateway.make_url("/v1/chat/completions"), payload, TIMING)
    [attempt] = timing_of(raw)["attempts"]
    assert attempt["start"] <= attempt["status"] <= attempt["first_token"]


async def test_with_the_playground_on_the_clock_says_the_sources_found(
    make_gateway, kb_path  # noqa: F811
):
    routes = {
        "kb": {"shop": {"path": str(kb_path)}},
        "rag": {"shop": {"kb": "shop"}},
        "routes": [{"path": "/voice/chat/completions", "rag": "shop"}],
    }
    payload = {"model": "text", "stream": True, "messages": QUESTION}
    shown = await make_gateway(playground={"enabled": True}, **routes)
    _, raw = await raw_post(shown.make_url("/voice/chat/completions"), payload, TIMING)
    sources = timing_of(raw)["retrieval"]["sources"]
    assert sources and {"source", "heading", "score"} == set(sources[0])
    assert sources[0]["source"] == "shop.md" and sources[0]["score"] > 0
    # without the playground, what the caller cannot see stays unsaid
    hidden = await make_gateway(**routes)
    _, raw = await raw_post(hidden.make_url("/voice/chat/completions"), payload, TIMING)
    assert "sources" not in timing_of(raw)["retrieval"]


async def test_with_the_playground_on_the_clock_says_each_tool_call(
    make_gateway, upstream, aiohttp_server
):
    from aiohttp import web

    async def weather(request: web.Request) -> web.Response:
        return web.json_response({"sky": "sunny", "pad": "x" * 2000})

    app = web.Application()
    app.router.add_post("/weather", weather)
    service = await aiohttp_server(app)
    gateway = await make_gateway(
        playground={"enabled": True},
        providers={"fake": {"base_url": upstream.url}},
        tools={"weather": {"kind": "http", "url": str(service.make_url("/weather")),
                           "description": "The weather.", "parameters": {"type": "object"}}},
        routes=[{"path": "/tools/chat/completions", "tools": ["weather"]}],
    )
    payload = {"model": "use-tools-weather", "stream": True,
               "messages": [{"role": "user", "content": "weather in Paris?"}]}
    _, raw = await raw_post(gateway.make_url("/tools/chat/completions"), payload, TIMING)
    [round_] = timing_of(raw)["tool_rounds"]
    [call] = round_["calls"]
    assert call["tool"] == "weather" and call["ok"]
    assert call["arguments"] == '{"city": "Paris"}'
    assert call["result"].startswith('{"sky":') and len(call["result"]) == 500
