"""A tools route: llmgate's own tools run server-side (an in-process HTTP tool service), the
caller's pass through, and the caller sees one answer across the rounds."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time

import aiohttp
import pytest
from aiohttp import web

from llmgate.app import LIVE
from tests.conftest import API_KEY, eventually, stream_chunks
from tests.fake_upstream import TOOL_ARGUMENTS, TOOL_CALL_DELTAS, USAGE
from tests.test_mcp import ServerThread

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
MESSAGES = [{"role": "user", "content": "weather in Paris?"}]
CALLER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


class ToolService:
    """The operator's tool endpoints: what they were asked, when, and what was closed."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict, dict]] = []  # (path, arguments, headers)
        self.spans: list[tuple[float, float]] = []
        self.closed = 0
        self.app = web.Application()
        self.app.router.add_route("*", "/{name}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        args = dict(request.query) if request.method == "GET" else await request.json()
        self.calls.append((name, args, dict(request.headers)))
        started = time.perf_counter()
        try:
            if name.startswith("slow"):
                await asyncio.sleep(float(name.removeprefix("slow") or 10))
        except asyncio.CancelledError:
            self.closed += 1
            raise
        self.spans.append((started, time.perf_counter()))
        if name == "fail":
            return web.json_response({"error": "database down"}, status=500)
        if name == "garbage":
            return web.Response(body=b'{"sky": sun', content_type="application/json")
        if name == "chunked":  # a body in two writes, the second a while later
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            await resp.write(b'{"sky": ')
            await asyncio.sleep(0.05)
            await resp.write(b'"sunny"}')
            await resp.write_eof()
            return resp
        return web.json_response({"tool": name, "args": args, "sky": "sunny"})


@pytest.fixture
async def service(aiohttp_server) -> ToolService:
    svc = ToolService()
    server = await aiohttp_server(svc.app)
    svc.url = str(server.make_url("/"))  # type: ignore[attr-defined]
    return svc


@pytest.fixture
def tools_gateway(make_gateway, upstream, service):
    async def make(tools: dict | None = None, **route):
        tools = tools or {"weather": {"path": "weather"}}
        sections = {
            name: {
                "kind": "http",
                "url": service.url + spec.pop("path"),
                "description": f"The {name} tool.",
                "parameters": CITY if name == "weather" else {"type": "object"},
                **spec,
            }
            for name, spec in tools.items()
        }
        return await make_gateway(
            providers={"fake": {"base_url": upstream.url, "idle_timeout_s": 30}},
            tools=sections,
            routes=[{"path": "/tools/chat/completions", "tools": list(sections), **route}],
        )

    return make


async def post(gateway, model: str, stream: bool = True, **body) -> tuple[int, bytes]:
    payload = {"model": model, "stream": stream, "messages": MESSAGES, **body}
    url = gateway.make_url("/tools/chat/completions")
    async with aiohttp.ClientSession() as s, s.post(url, json=payload, headers=HEADERS) as r:
        return r.status, await r.read()


def content(chunks: list[dict]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
    )


def tool_results(request: dict) -> list[str]:
    return [m["content"] for m in request["messages"] if m["role"] == "tool"]


async def test_our_tool_runs_and_the_caller_sees_one_answer(tools_gateway, upstream, service,
                                                            connect):
    gateway = await tools_gateway()
    client = connect(gateway).with_options(base_url=str(gateway.make_url("/tools")))
    stream = await client.chat.completions.create(
        model="use-tools-weather", messages=MESSAGES, stream=True
    )
    chunks = [c async for c in stream]
    assert {c.id for c in chunks} == {"chatcmpl-round0"} and len({c.created for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Let me see. Results: ") and '"sky": "sunny"' in text
    assert [c.choices[0].delta.role for c in chunks if c.choices[0].delta.role] == ["assistant"]
    assert not any(c.choices[0].delta.tool_calls for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert service.calls[0][:2] == ("weather", {"city": "Paris"})
    first, second = upstream.requests
    offered = [t["function"] for t in first["tools"]]
    assert offered == [{"name": "weather", "parameters": CITY, "description": "The weather tool."}]
    assistant = second["messages"][-2]
    assert assistant["content"] == "Let me see. "
    assert assistant["tool_calls"] == [
        {"id": "call_0_0", "type": "function",
         "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    ]
    assert second["messages"][-1]["tool_call_id"] == "call_0_0"
    assert json.loads(tool_results(second)[0])["sky"] == "sunny"


async def test_parallel_calls_overlap(tools_gateway, service):
    gateway = await tools_gateway(
        {"weather": {"path": "slow0.3"}, "lookup": {"path": "slow0.3"}}
    )
    status, raw = await post(gateway, "use-tools-weather+lookup")
    assert status == 200 and "Results:" in content(stream_chunks(raw))
    (a0, a1), (b0, b1) = service.spans
    assert a0 < b1 and b0 < a1  # the two ran at the same time, not one after the other


async def test_rounds_stop_at_max_tool_rounds(tools_gateway, upstream, service):
    gateway = await tools_gateway(max_tool_rounds=2)
    _status, raw = await post(gateway, "use-tools-always-weather")
    chunks = stream_chunks(raw)
    assert len(upstream.requests) == 3 and len(service.calls) == 2
    assert [r.get("tool_choice") for r in upstream.requests] == [None, None, "none"]
    assert content(chunks).endswith(".") and "Results:" in content(chunks)
    assert content(chunks).count("Let me see.") == 2  # every round's words, in order
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("model", "path", "told"),
    [
        ("use-tools-badjson", "weather", "error: the arguments are not valid JSON"),
        ("use-tools-badschema", "weather", "error: the arguments do not match the schema"),
        ("use-tools-weather", "fail", "error: tool weather answered HTTP 500"),
        ("use-tools-weather", "garbage", "error: tool weather answered JSON that does not parse"),
        ("use-tools-weather", "slow5", "error: tool weather timed out after 0.2 s"),
    ],
)
async def test_a_failing_call_is_told_to_the_model_and_the_turn_goes_on(
    tools_gateway, upstream, service, model, path, told
):
    gateway = await tools_gateway({"weather": {"path": path, "timeout_s": 0.2}})
    status, raw = await post(gateway, model)
    chunks = stream_chunks(raw)
    assert status == 200 and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    [result] = tool_results(upstream.requests[1])
    assert result.startswith(told), result
    assert "127.0.0.1" not in result and "Traceback" not in raw.decode()
    if model != "use-tools-weather":
        assert service.calls == []  # broken arguments never reach the tool


async def test_a_mixed_round_gives_the_caller_its_calls_and_drops_ours(
    tools_gateway, upstream, service
):
    gateway = await tools_gateway()
    _status, raw = await post(gateway, "use-tools-weather+get_weather", tools=[CALLER_TOOL])
    chunks = stream_chunks(raw)
    calls = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls") or ()]
    assert {d["index"] for d in calls} == {0}  # the caller's one call, renumbered from 1
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"] == "call_1_0"
    args = "".join(d["function"].get("arguments") or "" for d in calls)
    assert json.loads(args) == {"city": "Rome"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert service.calls == [] and len(upstream.requests) == 1


async def test_a_callers_tool_of_the_same_name_wins(tools_gateway, upstream, service):
    gateway = await tools_gateway()
    theirs = {"type": "function", "function": {"name": "weather", "parameters": {}}}
    _status, raw = await post(gateway, "use-tools-weather", tools=[theirs])
    chunks = stream_chunks(raw)
    assert upstream.requests[0]["tools"] == [theirs]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert service.calls == []


async def test_the_callers_tool_calls_pass_unchanged(tools_gateway, gateway):
    tools_route = await tools_gateway()
    _, through = await post(tools_route, "tools", tools=[CALLER_TOOL])
    # (model "tools" sends no usage fields, so here the chunks are the same in every key)
    url = gateway.make_url("/v1/chat/completions")
    body = {"model": "tools", "stream": True, "messages": MESSAGES, "tools": [CALLER_TOOL]}
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=HEADERS) as r:
        plain = await r.read()
    assert stream_chunks(through) == stream_chunks(plain)
    deltas = [c["choices"][0]["delta"] for c in stream_chunks(through)]
    assert [d.get("tool_calls") for d in deltas if d.get("tool_calls")] == [
        d["tool_calls"] for d in TOOL_CALL_DELTAS
    ]


async def test_the_filler_is_said_only_while_a_tool_runs_long(tools_gateway):
    filler = {"phrases": ["Let me check that for you."], "after_ms": 100}
    slow = await tools_gateway({"weather": {"path": "slow0.5"}}, tool_filler=filler)
    said = content(stream_chunks((await post(slow, "use-tools-weather"))[1]))
    assert said.startswith("Let me see. Let me check that for you. Results:")
    filler = {"phrases": ["Let me check.", "One moment."], "after_ms": 100}
    slow = await tools_gateway({"weather": {"path": "slow0.3"}}, tool_filler=filler)
    said = [content(stream_chunks((await post(slow, "use-tools-weather"))[1])) for _ in range(2)]
    assert "Let me check." in said[0] and "One moment." in said[1]  # they take turns
    fast = await tools_gateway(tool_filler=filler)
    said = content(stream_chunks((await post(fast, "use-tools-weather"))[1]))
    assert "Let me check" not in said


async def test_a_hang_up_during_a_tool_call_closes_its_request(tools_gateway, upstream, service):
    gateway = await tools_gateway({"weather": {"path": "slow10", "timeout_s": 30}})
    body = {"model": "use-tools-weather", "stream": True, "messages": MESSAGES}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            gateway.make_url("/tools/chat/completions"), json=body, headers=HEADERS
        )
        await resp.content.readline()
        await eventually(lambda: len(service.calls) == 1)
        resp.close()
    await eventually(lambda: service.closed == 1, timeout=2)
    assert len(upstream.requests) == 1


async def test_not_streamed_the_same_loop_answers_one_completion(tools_gateway, upstream):
    gateway = await tools_gateway()
    status, raw = await post(gateway, "use-tools-weather", stream=False)
    completion = json.loads(raw)
    message = completion["choices"][0]["message"]
    assert status == 200 and message["content"].startswith("Let me see. Results: ")
    assert "tool_calls" not in message and completion["choices"][0]["finish_reason"] == "stop"
    # usage summed over the two rounds
    assert completion["usage"]["total_tokens"] == 2 * USAGE["total_tokens"]


async def test_usage_is_one_chunk_summed_over_rounds(tools_gateway):
    gateway = await tools_gateway()
    _status, raw = await post(
        gateway, "use-tools-weather", stream_options={"include_usage": True}
    )
    chunks = stream_chunks(raw)
    usages = [c["usage"] for c in chunks if c.get("usage")]
    assert usages == [{k: 2 * v for k, v in USAGE.items()}]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usages[0]


async def test_the_turn_line_names_each_call(tools_gateway, caplog):
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    gateway = await tools_gateway({"weather": {"path": "fail"}})
    await post(gateway, "use-tools-weather")
    [turn] = [r.turn for r in caplog.records if r.name == "llmgate.turn"]
    [call] = turn["tools"]["calls"]
    assert call["name"] == "weather" and call["round"] == 1 and call["ok"] is False
    assert call["error"] == "tool weather answered HTTP 500" and "ms" in call
    assert turn["tools"]["rounds"] == 2


async def test_a_get_tool_sends_query_parameters_and_metadata_headers(
    make_gateway, upstream, service
):
    gateway = await make_gateway(
        providers={"fake": {"base_url": upstream.url}},
        tools={"weather": {"kind": "http", "method": "GET", "url": service.url + "weather",
                           "parameters": CITY, "metadata": {"channel": "X-Channel"}}},
        routes=[{"path": "/tools/chat/completions", "tools": ["weather"]}],
    )
    await post(gateway, "use-tools-weather", context={"appId": "a", "channel": "room-7"})
    [(name, args, headers)] = service.calls
    assert (name, args, headers["X-Channel"]) == ("weather", {"city": "Paris"}, "room-7")


@pytest.fixture(scope="module")
def mcp_server():
    server = ServerThread().start()
    yield server
    server.stop()


async def test_an_mcp_servers_tool_is_listed_and_called(make_gateway, upstream, mcp_server,
                                                        caplog):
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    gateway = await make_gateway(
        providers={"fake": {"base_url": upstream.url}},
        tools={"crm": {"kind": "mcp", "url": mcp_server.url, "allowed": ["echo"]}},
        routes=[{"path": "/tools/chat/completions", "tools": ["crm"]}],
    )
    crm = gateway.app[LIVE].current.toolbox.mcp["crm"]
    await eventually(lambda: bool(crm.tools()))
    status, raw = await post(gateway, "use-tools-echo")
    assert status == 200 and "echo: hi" in content(stream_chunks(raw))
    first, second = upstream.requests
    [offered] = [t["function"] for t in first["tools"]]
    assert offered["name"] == "echo" and offered["parameters"]["properties"]["text"]
    assert tool_results(second) == ["echo: hi"]
    [turn] = [r.turn for r in caplog.records if r.name == "llmgate.turn"]
    [call] = turn["tools"]["calls"]
    assert (call["name"], call["server"], call["ok"]) == ("echo", "crm", True)


async def test_parallel_caller_calls_pass_byte_for_byte_and_parse_alike(
    tools_gateway, gateway, upstream, connect
):
    """Two calls of the caller's at once, their arguments cut across many chunks: the plain
    route relays the provider's bytes; the tools route gives the same chunks; the openai SDK
    makes the same tool_calls of both."""
    body = {"model": "use-tools-get_weather+get_weather", "stream": True,
            "messages": MESSAGES, "tools": [CALLER_TOOL]}
    async with aiohttp.ClientSession() as s:
        async with s.post(upstream.url + "/chat/completions", json=body) as r:
            direct = await r.read()
        async with s.post(gateway.make_url("/v1/chat/completions"), json=body,
                          headers=HEADERS) as r:
            plain = await r.read()
    assert plain == direct
    tools_route = await tools_gateway()
    _, through = await post(tools_route, body["model"], tools=[CALLER_TOOL])
    # (a tools route asks for usage to sum it: the provider's chunks then say usage: null)
    without_usage = [{k: v for k, v in c.items() if k != "usage"} for c in stream_chunks(through)]
    assert without_usage == stream_chunks(plain)

    async def sdk_calls(server, base: str) -> list:
        client = connect(server).with_options(base_url=str(server.make_url(base)))
        async with client.beta.chat.completions.stream(
            model=body["model"], messages=MESSAGES, tools=[CALLER_TOOL]
        ) as stream:
            final = await stream.get_final_completion()
        return [c.model_dump() for c in final.choices[0].message.tool_calls]

    calls = await sdk_calls(gateway, "/v1")
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Rome"}] * 2
    assert [c["id"] for c in calls] == ["call_0_0", "call_1_0"]
    assert await sdk_calls(tools_route, "/tools") == calls


def test_tool_names_sent_to_the_model_are_valid_and_unique():
    from llmgate.tools.registry import function_name

    taken: dict = {}
    for raw in ["crm.lookup", "crm/lookup", "crm_lookup", "x" * 80, "x" * 80, ""]:
        taken[function_name(raw, taken)] = None
    names = list(taken)
    assert names[:3] == ["crm_lookup", "crm_lookup_2", "crm_lookup_3"]
    assert names[3] == "x" * 64 and names[4] == "x" * 62 + "_2" and names[5] == "tool"
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", n) for n in names)


@pytest.mark.parametrize(
    "model", ["use-tools-late-name-weather", "use-tools-no-index-weather+lookup"]
)
async def test_calls_named_late_or_sent_without_index_are_still_ours(
    tools_gateway, upstream, service, model
):
    gateway = await tools_gateway({"weather": {"path": "weather"}, "lookup": {"path": "lookup"}})
    status, raw = await post(gateway, model)
    chunks = stream_chunks(raw)
    assert status == 200 and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert not any(c["choices"][0]["delta"].get("tool_calls") for c in chunks)
    calls = upstream.requests[1]["messages"][-1 - len(service.calls)]["tool_calls"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [
        json.loads(TOOL_ARGUMENTS[name]) for name in model.rsplit("-", 1)[1].split("+")
    ]
    assert all(r.startswith("{") for r in tool_results(upstream.requests[1]))


async def test_a_result_that_comes_in_pieces_is_read_whole(tools_gateway, upstream):
    gateway = await tools_gateway({"weather": {"path": "chunked"}})
    await post(gateway, "use-tools-weather")
    assert tool_results(upstream.requests[1]) == ['{"sky": "sunny"}']


async def test_with_n_above_one_our_tools_stay_out(tools_gateway, upstream, service):
    gateway = await tools_gateway()
    await post(gateway, "text", n=2)
    assert "tools" not in upstream.requests[0] and service.calls == []


def test_usage_sums_nested_counts():
    from llmgate.stages.tools import _summed

    one = {"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 3}, "x": None}
    assert _summed(_summed(None, one), one) == {
        "prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 6}, "x": None
    }
