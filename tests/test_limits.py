"""Limits per caller key and in all: a 429 with Retry-After before any upstream work."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import openai
import pytest

from llmgate.config import ConfigError, parse
from llmgate.server.auth import Caller, Rule
from llmgate.server.limits import LocalLimits, default_global_max
from tests.conftest import API_KEY, eventually

HI = [{"role": "user", "content": "hi"}]
AGORA = "agora-secret-key-1"


def keyed(**limits):
    return {
        "api_keys": [API_KEY],
        "keys": [{"key": AGORA, "name": "agora-prod", **limits}],
    }


async def test_requests_per_minute_per_key(make_gateway, upstream, connect, caplog):
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    gw = await make_gateway(server=keyed(requests_per_minute=2))
    agora, other = connect(gw, AGORA), connect(gw)
    for _ in range(2):
        await agora.chat.completions.create(model="text", messages=HI)
    with pytest.raises(openai.RateLimitError) as info:
        await agora.chat.completions.create(model="text", messages=HI, stream=True)
    assert info.value.body["type"] == "rate_limit_error"
    assert "agora-prod" in info.value.body["message"]
    retry = int(info.value.response.headers["Retry-After"])
    assert 1 <= retry <= 30  # a request every 60 / 2 s once the burst is spent
    assert len(upstream.requests) == 2  # the third did no upstream work
    await other.chat.completions.create(model="text", messages=HI)  # another key's budget
    lines = [r.turn for r in caplog.records if r.name == "llmgate.turn"]
    assert [t["key"] for t in lines] == ["agora-prod"] * 3 + ["api_keys[0]"]
    assert lines[2]["status"] == 429
    assert AGORA not in caplog.text


async def test_concurrent_streams_per_key_and_a_hang_up_frees_its_slot(
    make_gateway, upstream, connect
):
    gw = await make_gateway(server=keyed(max_concurrent=1))
    agora = connect(gw, AGORA)
    url = gw.make_url("/v1/chat/completions")
    body = {"model": "stall-mid", "messages": HI, "stream": True}
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {AGORA}"}
        resp = await session.post(url, json=body, headers=headers)
        assert resp.status == 200
        await resp.content.readline()
        with pytest.raises(openai.RateLimitError) as info:
            await agora.chat.completions.create(model="text", messages=HI)
        assert info.value.response.headers["Retry-After"] == "1"
        assert len(upstream.requests) == 1
        resp.close()  # the caller hangs up
    await eventually(lambda: upstream.open_streams == 0)
    await agora.chat.completions.create(model="text", messages=HI)


async def test_global_max_concurrent_across_keys(make_gateway, upstream, connect):
    server = {**keyed(), "limits": {"global_max_concurrent": 1}}
    gw = await make_gateway(server=server)
    body = {"model": "stall-mid", "messages": HI, "stream": True}
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        resp = await session.post(gw.make_url("/v1/chat/completions"), json=body, headers=headers)
        await resp.content.readline()
        with pytest.raises(openai.RateLimitError) as info:
            await connect(gw, AGORA).chat.completions.create(model="text", messages=HI)
        assert "streams in flight" in info.value.body["message"]
        resp.close()
    await eventually(lambda: upstream.open_streams == 0)
    await connect(gw, AGORA).chat.completions.create(model="text", messages=HI)


def test_requests_per_minute_on_a_clock():
    now = [600.0]
    limits = LocalLimits(100, lambda: now[0])
    caller = Caller("k", "k", Rule(max_concurrent=100, requests_per_minute=4))

    def admit() -> int | None:
        try:
            asyncio.run(limits.admit(caller))
        except Exception as exc:
            return int(exc.headers["Retry-After"])  # type: ignore[attr-defined]
        asyncio.run(limits.release(caller))
        return None

    assert [admit() for _ in range(4)] == [None] * 4  # a minute's budget at once
    # then one request every 15 s: the next in 15 s, not past the minute's end
    assert admit() == 15
    now[0] += 14
    assert admit() is not None
    now[0] += 1
    assert admit() is None
    assert admit() == 15
    now[0] += 120  # two idle minutes: the whole budget again, and no more
    assert [admit() for _ in range(5)] == [None] * 4 + [15]


def test_no_per_key_limit_unless_one_is_set(monkeypatch):
    raw = {"server": {"api_keys": ["k"]}, "providers": {"p": {"base_url": "http://x/v1"}}}
    limits = parse(raw, {}).config.server.limits
    assert (limits.max_concurrent, limits.requests_per_minute) == (None, None)
    state = LocalLimits(100_000, lambda: 0.0)
    caller = Caller("k", "k", Rule(limits.max_concurrent, limits.requests_per_minute))
    for _ in range(5000):  # one Agora key carrying every call: never refused for its own
        asyncio.run(state.admit(caller))
    assert limits.global_max_concurrent is None  # sized from the open-file limit
    monkeypatch.setattr(
        "llmgate.server.limits.resource.getrlimit", lambda _: (65536, 65536)
    )
    assert default_global_max() == (65536 - 128) // 2
    monkeypatch.setattr("llmgate.server.limits.resource.getrlimit", lambda _: (1024, 4096))
    assert default_global_max() == (1024 - 128) // 2


@pytest.mark.parametrize("limit", [1, 2, 10, 60])
@pytest.mark.parametrize("start", [0.0, 17.0, 45.5, 59.9])
def test_retry_after_is_enough(limit, start):
    """A caller that waits what Retry-After said is admitted then."""
    now = [6000.0 + start]
    limits = LocalLimits(10_000, lambda: now[0])
    caller = Caller("k", "k", Rule(max_concurrent=10_000, requests_per_minute=limit))
    for _ in range(3 * limit):  # a burst, then every 429's advice taken
        try:
            asyncio.run(limits.admit(caller))
        except Exception as exc:
            wait = int(exc.headers["Retry-After"])  # type: ignore[attr-defined]
            assert 1 <= wait <= max(1, 60 // limit)  # never past the minute's own share
            now[0] += wait
            asyncio.run(limits.admit(caller))  # raises if the advice was too short


def test_an_unset_named_key_is_dropped_and_names_must_differ():
    raw = {
        "server": {
            "keys": [
                {"key": "${UNSET_KEY}", "name": "a"},
                {"key": "kept", "name": "b"},
            ]
        },
        "providers": {"p": {"base_url": "http://127.0.0.1:1/v1"}},
    }
    loaded = parse(raw, {})
    assert [k.name for k in loaded.config.server.keys] == ["b"]
    assert any("server.keys[0].key" in w for w in loaded.warnings)
    raw["server"]["keys"] = [{"key": "x", "name": "a"}, {"key": "y", "name": "a"}]
    with pytest.raises(ConfigError, match=r"server.keys\[1\].name"):
        parse(raw, {})
