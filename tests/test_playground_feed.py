"""GET /playground/events: every turn as it ends, with its clock, no message text."""

from __future__ import annotations

import asyncio
import json
from unittest import mock

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request

from llmgate.config import PlaygroundConfig
from llmgate.server.playground import Events
from tests.conftest import API_KEY
from tests.test_cancellation import agora_body

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


async def test_off_unless_enabled(gateway):
    async with aiohttp.ClientSession() as session, session.get(
        gateway.make_url("/playground/events"), headers=HEADERS
    ) as resp:
        assert resp.status == 404


async def test_a_turn_sent_by_another_client_appears_with_its_clock(make_gateway):
    gateway = await make_gateway(playground={"enabled": True})
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url("/playground/events")) as resp:
            assert resp.status == 401  # a caller key, as for any request
        feed = await session.get(gateway.make_url("/playground/events"), headers=HEADERS)
        assert feed.status == 200
        assert feed.headers["Content-Type"].startswith("text/event-stream")
        await asyncio.sleep(0.05)  # (subscribed)
        async with session.post(  # as Agora's engine would send it
            gateway.make_url("/v1/chat/completions"), data=agora_body("text", 4, "room-9"),
            headers={**HEADERS, "Content-Type": "application/json"},
        ) as turn:
            await turn.read()
        data = None
        async with asyncio.timeout(5):
            async for line in feed.content:
                if line.startswith(b"data: "):
                    data = json.loads(line[6:])
                    break
        feed.close()
    assert data["channel"] == "app/room-9" and data["turn_id"] == 4
    assert data["status"] == 200 and data["route"] == "/chat/completions"
    assert data["admitted"] <= data["first_token"] <= data["done"]
    assert "hi" not in json.dumps(data) and API_KEY not in json.dumps(data)


async def test_loopback_only_unless_allowed():
    keys = mock.Mock()
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        ("10.1.2.3", 5555) if name == "peername" else default
    )
    request = make_mocked_request("GET", "/playground/events", transport=transport)
    with pytest.raises(Exception) as info:
        await Events(PlaygroundConfig(enabled=True), keys).handle(request)
    assert getattr(info.value, "status", None) == 403
    keys.assert_not_called()
