"""Barge-in: a caller that hangs up ends its turn upstream at once, and leaves nothing behind."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os

import aiohttp
import pytest
from aiohttp_sse import EventSourceResponse

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
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_thousand_hang_ups_leave_nothing_behind(gateway, upstream):
    async with aiohttp.ClientSession() as session:
        await hang_up_after(session, gateway, "stall-mid", 2)  # warm up lazily made objects
        await eventually(lambda: upstream.open_streams == 0)
        tasks, fds = len(asyncio.all_tasks()), open_fds()
        for _ in range(1000):
            await hang_up_after(session, gateway, "stall-mid", 2)
        await eventually(lambda: upstream.cancelled == 1001 and upstream.open_streams == 0)
    assert upstream.finished == 0
    await eventually(lambda: len(asyncio.all_tasks()) <= tasks)
    await eventually(lambda: open_fds() <= fds)
    connector = gateway.app[SESSION].connector
    assert sum(len(c) for c in connector._conns.values()) == 0  # nothing pooled mid-answer
    assert live(aiohttp.ClientResponse) == 0
    assert live(EventSourceResponse) == 0
    assert live(Turn) == 0
