"""Barge-in: a caller that hangs up ends its turn upstream at once, and leaves nothing behind."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os

import aiohttp
import pytest

from llmgate.agora import channel_key
from llmgate.server.stream import SSEResponse
from llmgate.turn import Turn
from llmgate.upstream.client import SESSION
from tests.conftest import API_KEY, eventually

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def body(model: str) -> bytes:
    return json.dumps(
        {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()


async def hang_up_after(session, gateway, model: str, lines: int) -> None:
    """Open a stream, read `lines` SSE lines (0: only our headers), then drop the connection."""
    resp = await session.post(
        gateway.make_url("/v1/chat/completions"), data=body(model), headers=HEADERS
    )
    assert resp.status == 200
    for _ in range(lines):
        await resp.content.readline()
    resp.close()


# Storms of hang-ups from one key, far past [server.limits]' defaults.
UNLIMITED = {
    "limits": {
        "max_concurrent": 10_000,
        "requests_per_minute": 100_000,
        "global_max_concurrent": 10_000,
    }
}


def turn_statuses(caplog) -> list[int]:
    return [r.turn["status"] for r in caplog.records if r.name == "llmgate.turn"]


@pytest.mark.parametrize(("model", "lines"), [("stall", 0), ("stall-mid", 2)])
async def test_hang_up_closes_the_upstream_request(gateway, upstream, caplog, model, lines):
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    async with aiohttp.ClientSession() as session:
        await hang_up_after(session, gateway, model, lines)
        await eventually(lambda: upstream.cancelled == 1)
    await eventually(lambda: turn_statuses(caplog) == [499])
    assert upstream.open_streams == 0


async def test_hang_up_before_upstream_headers(gateway, upstream, caplog):
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    async with aiohttp.ClientSession() as session:
        request = session.post(
            gateway.make_url("/v1/chat/completions"), data=body("slow-headers"), headers=HEADERS
        )
        task = asyncio.ensure_future(request)
        await eventually(lambda: upstream.open_streams == 1)
        task.cancel()
        await eventually(lambda: upstream.cancelled == 1)
    await eventually(lambda: turn_statuses(caplog) == [499])


def live(kind: type) -> int:
    gc.collect()
    # type(), not isinstance(): isinstance reads __class__, which makes the openai package's
    # lazy proxies import whole modules.
    return sum(1 for o in gc.get_objects() if issubclass(type(o), kind))


def tracked_objects(upstream) -> int:
    upstream.requests.clear()  # the fake's own record of what it was sent
    upstream.headers.clear()
    gc.collect()
    return len(gc.get_objects())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_thousand_hang_ups_leave_nothing_behind(make_gateway, upstream):
    gateway = await make_gateway(server=UNLIMITED)
    async with aiohttp.ClientSession() as session:
        for _ in range(200):  # warm up: caches and pools fill to their size first
            await hang_up_after(session, gateway, "stall-mid", 2)
        await eventually(lambda: upstream.open_streams == 0)
        tasks, fds, objects = len(asyncio.all_tasks()), open_fds(), tracked_objects(upstream)
        for _ in range(1000):
            await hang_up_after(session, gateway, "stall-mid", 2)
        await eventually(lambda: upstream.cancelled == 1200 and upstream.open_streams == 0)
    assert upstream.finished == 0
    await eventually(lambda: len(asyncio.all_tasks()) <= tasks)
    await eventually(lambda: open_fds() <= fds)
    # Pools and caches wobble by a few hundred; a leak of one object a turn would not.
    # (Counted first: the isinstance-like checks below fill ABC caches with weakrefs.)
    await eventually(lambda: tracked_objects(upstream) - objects < 500)
    connector = gateway.app[SESSION].connector
    assert sum(len(c) for c in connector._conns.values()) == 0  # nothing pooled mid-answer
    assert live(aiohttp.ClientResponse) == 0
    assert live(SSEResponse) == 0
    assert live(Turn) == 0


def agora_body(model: str, turn_id: int, channel: str = "ch1") -> bytes:
    message = {"role": "user", "content": "hi", "turn_id": turn_id, "timestamp": 1}
    context = {"appId": "app", "channel": channel}
    return json.dumps(
        {"model": model, "stream": True, "messages": [message], "context": context}
    ).encode()


async def test_newer_turn_on_the_channel_ends_the_older_one(gateway, upstream, caplog):
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    url = gateway.make_url("/v1/chat/completions")
    async with aiohttp.ClientSession() as session:
        old = await session.post(url, data=agora_body("stall-mid", 1), headers=HEADERS)
        await old.content.readline()  # the older answer has begun
        other = await session.post(url, data=agora_body("stall-mid", 5, "ch2"), headers=HEADERS)
        await other.content.readline()
        async with session.post(url, data=agora_body("text", 2), headers=HEADERS) as new:
            assert (await new.read()).endswith(b"data: [DONE]\n\n")
        await eventually(lambda: upstream.cancelled == 1)
        assert b"[DONE]" not in await old.read()
        assert upstream.open_streams == 1  # the other channel's turn goes on
        other.close()
    turns = [r.turn for r in caplog.records if r.name == "llmgate.turn"]
    ends = [(t["status"], t.get("error")) for t in turns]
    assert (200, None) in ends and (499, "superseded") in ends


async def test_an_older_turn_id_supersedes_nothing(gateway, upstream):
    url = gateway.make_url("/v1/chat/completions")
    async with aiohttp.ClientSession() as session:
        live = await session.post(url, data=agora_body("stall-mid", 3), headers=HEADERS)
        await live.content.readline()
        async with session.post(url, data=agora_body("text", 2), headers=HEADERS) as late:
            assert (await late.read()).endswith(b"data: [DONE]\n\n")
        assert upstream.cancelled == 0 and upstream.open_streams == 1
        live.close()


@pytest.mark.parametrize(
    ("metadata", "key"),
    [
        ({"context": {"appId": "a", "channel": "c"}}, "a/c"),
        ({"app_id": "a", "channel": "c"}, "a/c"),
        ({"channel": "c"}, "/c"),
        ({"context": {"userId": "u"}}, None),
        ({"channel": 5}, None),
        ({}, None),
    ],
)
def test_channel_key(metadata, key):
    assert channel_key(metadata) == key


async def test_a_finished_stream_leaves_no_reference_cycle(gateway):
    """Cycles wait for the garbage collector, whose pauses a voice call hears."""
    gc.collect()
    gc.disable()
    try:
        async with aiohttp.ClientSession() as session:
            for model in ("text", "stall-mid"):
                resp = await session.post(
                    gateway.make_url("/v1/chat/completions"), data=body(model), headers=HEADERS
                )
                await (resp.read() if model == "text" else resp.content.readline())
                resp.close()
        await eventually(lambda: not any(type(o) is SSEResponse for o in gc.get_objects()))
        assert not any(type(o) is Turn for o in gc.get_objects())
    finally:
        gc.enable()


async def test_storms_of_concurrent_hang_ups_leave_nothing_behind(make_gateway, upstream):
    gateway = await make_gateway(server=UNLIMITED)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    tasks, counts = len(asyncio.all_tasks()), []
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(3):
            storm = (hang_up_after(session, gateway, "stall-mid", 2) for _ in range(200))
            await asyncio.gather(*storm)
            await eventually(lambda: upstream.open_streams == 0)
            await eventually(lambda: len(asyncio.all_tasks()) <= tasks)  # turns wound up
            counts.append(tracked_objects(upstream))
        # The first storm fills pools; later ones add nothing that stays (callbacks still
        # queued when a storm ends may hold a few objects for a moment).
        await eventually(lambda: tracked_objects(upstream) - counts[1] < 200)
    assert upstream.cancelled == 600
