"""One wire contract whichever path carries a turn: the same provider behaviour reaches the
caller the same way through a plain route, a one-target alias, a two-target alias and a
speech route, streamed and not."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from tests.conftest import API_KEY

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
HI = [{"role": "user", "content": "hi"}]
# (path, model) for each way a turn can go; "{m}" is the fake upstream's behaviour
PATHS = {
    "plain": ("/v1/chat/completions", "{m}"),
    "alias-1": ("/v1/chat/completions", "one-{m}"),
    "alias-2": ("/v1/chat/completions", "two-{m}"),
    "speech": ("/v1/speech/chat/completions", "{m}"),
}
BEHAVIOURS = ["text", "tools", "error-mid", "truncated", "status-429", "html"]


@pytest.fixture
async def contract_gateway(make_gateway):
    models = {f"one-{m}": [f"fake/{m}"] for m in BEHAVIOURS}
    models |= {f"two-{m}": [f"fake/{m}", f"fake/{m}"] for m in BEHAVIOURS}
    return await make_gateway(
        models=models,
        routes=[{"path": "/chat/completions"},
                {"path": "/speech/chat/completions", "speech": True}],
    )


async def what_the_caller_gets(gateway, path: str, model: str, stream: bool) -> dict[str, Any]:
    """What a caller can tell apart: status, content, tool calls, finish, the error's type
    and code, whether the stream ended with [DONE]."""
    body = {"model": model, "messages": HI, "stream": stream}
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.make_url(path), json=body, headers=HEADERS) as resp,
    ):
        raw = await resp.read()
        status, request_id = resp.status, resp.headers.get("X-Request-Id", "")
    out: dict[str, Any] = {"status": status}
    if status != 200:
        error = json.loads(raw)["error"]
        out["error"] = (error["type"], error["code"])
        return out
    if not stream:
        answer = json.loads(raw)
        message = answer["choices"][0]["message"]
        out["content"] = message.get("content") or ""
        out["tool_calls"] = [c["function"]["name"] for c in message.get("tool_calls") or []]
        out["finish"] = answer["choices"][0]["finish_reason"]
        return out
    payloads = [f[6:] for f in raw.split(b"\n\n") if f.startswith(b"data: ")]
    out["done"] = payloads[-1:] == [b"[DONE]"]
    content, calls, finish = "", [], None
    for p in payloads:
        if p == b"[DONE]":
            continue
        chunk = json.loads(p)
        if "error" in chunk:
            error = chunk["error"]
            out["error"] = (error["type"], error["code"])
            assert request_id in error["message"]  # the turn can be found in the log
            continue
        for choice in chunk["choices"]:
            delta = choice.get("delta") or {}
            content += delta.get("content") or ""
            calls += [c["function"]["name"] for c in delta.get("tool_calls") or []
                      if c.get("function", {}).get("name")]
            finish = choice.get("finish_reason") or finish
    out |= {"content": content, "tool_calls": calls, "finish": finish}
    return out


UPSTREAM_ERROR = ("api_error", "upstream_error")
# What the plain route gives for each behaviour (every other path must give the same)
EXPECTED = {
    ("text", True): {"status": 200, "done": True, "finish": "stop", "tool_calls": []},
    ("text", False): {"status": 200, "finish": "stop", "tool_calls": []},
    ("tools", True): {"status": 200, "done": True, "finish": "tool_calls",
                      "tool_calls": ["get_weather"]},
    ("tools", False): {"status": 200, "finish": "tool_calls", "tool_calls": ["get_weather"]},
    ("error-mid", True): {"status": 200, "done": False, "error": UPSTREAM_ERROR},
    ("error-mid", False): {"status": 502, "error": UPSTREAM_ERROR},
    ("truncated", True): {"status": 200, "done": False, "error": UPSTREAM_ERROR},
    ("truncated", False): {"status": 502, "error": UPSTREAM_ERROR},
    # a provider's own 4xx: its type and code reach the caller
    ("status-429", True): {"status": 429, "error": ("invalid_request_error", "fake_code")},
    ("status-429", False): {"status": 429, "error": ("invalid_request_error", "fake_code")},
    ("html", True): {"status": 502, "error": UPSTREAM_ERROR},
    ("html", False): {"status": 502, "error": UPSTREAM_ERROR},
}


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("behaviour", BEHAVIOURS)
async def test_every_path_says_it_the_same_way(contract_gateway, behaviour, stream):
    got = {
        name: await what_the_caller_gets(
            contract_gateway, path, model.format(m=behaviour), stream
        )
        for name, (path, model) in PATHS.items()
    }
    plain = got["plain"]
    assert {k: plain.get(k) for k in EXPECTED[behaviour, stream]} == EXPECTED[behaviour, stream]
    assert got["alias-1"] == got["plain"], got
    assert got["alias-2"] == got["plain"], got
    # the speech stage changes what is said (the emoji goes), nothing else
    speech, plain = dict(got["speech"]), dict(got["plain"])
    assert bool(speech.pop("content", "")) == bool(plain.pop("content", "")), got
    assert speech == plain, got
