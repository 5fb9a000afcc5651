"""History as Agora's engine keeps it: llmgate's own phrases out of the assistant's memory."""

from __future__ import annotations

import pytest

from llmgate.agora import own_phrases_out
from tests.test_rag import kb_path, rag_client  # noqa: F401 (fixture)

WAITING = "One moment, let me check."
APOLOGY = "Sorry, I lost my connection. Could you say that again?"


def history(*assistant: str) -> list[dict]:
    messages: list[dict] = [{"role": "system", "content": "Be brief."}]
    for i, said in enumerate(assistant):
        messages += [{"role": "user", "content": f"question {i} {WAITING}"},
                     {"role": "assistant", "content": said}]
    return [*messages, {"role": "user", "content": "and now?"}]


def test_phrases_come_out_at_the_start_whole_or_at_the_end():
    messages = history(
        f"{WAITING} The store opens at nine.",  # at the start
        WAITING,  # the whole message: dropped
        f"The store opens at {APOLOGY}",  # the apology after a cut answer
        "We open at nine. One moment, let me check. is not a phrase here",  # mid-text: kept
    )
    own_phrases_out(messages, (APOLOGY, WAITING))
    said = [m["content"] for m in messages if m["role"] == "assistant"]
    assert said == [
        "The store opens at nine.",
        "The store opens at",
        "We open at nine. One moment, let me check. is not a phrase here",
    ]
    assert all(WAITING in m["content"] for m in messages if m["content"].startswith("question"))


def test_an_emptied_message_with_tool_calls_is_kept():
    call = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": WAITING, "tool_calls": call},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    own_phrases_out(messages, (WAITING,))
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": call}


async def test_the_rag_route_sends_the_provider_a_clean_history(
    make_gateway, kb_path, connect, upstream  # noqa: F811
):
    gateway = await make_gateway(
        kb={"shop": {"path": str(kb_path)}},
        rag={"shop": {"kb": "shop", "waiting": {"phrases": [WAITING]}}},
        routes=[{"path": "/rag/chat/completions", "rag": "shop"}],
    )
    messages = history(f"{WAITING} It costs 9.95 pounds.", WAITING)
    await rag_client(connect, gateway).chat.completions.create(model="text", messages=messages)
    sent = upstream.requests[0]["messages"]
    said = [m["content"] for m in sent if m["role"] == "assistant"]
    assert said == ["It costs 9.95 pounds."]
    assert [m["role"] for m in sent if m["role"] != "system"] == ["user", "assistant", "user",
                                                                  "user"]


@pytest.mark.parametrize("apology", [True, False])
async def test_the_plain_route_takes_out_its_apology_only(make_gateway, connect, upstream,
                                                          apology):
    server = {"on_stream_error": "apology", "apology": APOLOGY} if apology else {}
    gateway = await make_gateway(server=server)
    messages = history(f"It costs {APOLOGY}", f"{WAITING} It costs 9.95 pounds.")
    await connect(gateway).chat.completions.create(model="text", messages=messages)
    said = [m["content"] for m in upstream.requests[0]["messages"] if m["role"] == "assistant"]
    first = "It costs" if apology else f"It costs {APOLOGY}"
    assert said == [first, f"{WAITING} It costs 9.95 pounds."]  # no waiting phrase here


APPENDED = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the weather"},
    {"role": "user", "content": "in Paris?"},  # appended: interruption off
]
ENDING = [*APPENDED, {"role": "assistant", "content": "Let me"}]


@pytest.mark.parametrize("route", ["plain", "speech", "tools", "audio"])
@pytest.mark.parametrize("messages", [APPENDED, ENDING], ids=["appended", "assistant-last"])
async def test_every_route_takes_turns_that_do_not_alternate(
    make_gateway, upstream, aiohttp_server, route, messages
):
    import aiohttp
    from aiohttp import web

    async def weather(request: web.Request) -> web.Response:
        return web.json_response({"sky": "sunny"})

    tool_app = web.Application()
    tool_app.router.add_post("/weather", weather)
    tool = await aiohttp_server(tool_app)
    sections = {
        "plain": {"path": "/r/chat/completions"},
        "speech": {"path": "/r/chat/completions", "speech": True},
        "tools": {"path": "/r/chat/completions", "tools": ["weather"]},
        "audio": {"path": "/r/chat/completions", "audio": "voice"},
    }
    gateway = await make_gateway(
        tools={"weather": {"kind": "http", "url": str(tool.make_url("/weather")),
                           "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}},
        audio={"voice": {"engine": "piper", "pace": False}},
        routes=[sections[route]],
    )
    model = "use-tools-weather" if route == "tools" else "text"
    async with aiohttp.ClientSession() as session, session.post(
        gateway.make_url("/r/chat/completions"),
        json={"model": model, "stream": True, "messages": messages},
        headers={"Authorization": "Bearer test-key"},
    ) as resp:
        raw = await resp.read()
    assert resp.status == 200 and raw.endswith(b"data: [DONE]\n\n")
    sent = upstream.requests[-1]["messages"]
    assert sent[: len(messages)] == messages  # the turn's own messages as they came
    if route == "tools":  # the tools loop appends after them: the call, then its result
        assert [m["role"] for m in sent[len(messages):]] == ["assistant", "tool"]
