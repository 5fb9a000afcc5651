"""The serving code every way of running goes through: a hang-up cancels the turn there too."""

from __future__ import annotations

import socket

import aiohttp

from llmgate.app import create_app
from llmgate.config import parse
from llmgate.server import serve
from llmgate.server.aiohttp_compat import GuardedSite
from tests.conftest import API_KEY, eventually, gateway_config
from tests.test_cancellation import body


async def test_a_hang_up_cancels_the_turn_when_served_by_llmgate(upstream):
    sock = serve.listen("127.0.0.1", 0, 12.5)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 12500
    raw = gateway_config(upstream.url)
    raw["providers"]["fake"]["idle_timeout_s"] = 60  # only the hang-up can end this turn
    runner = await serve.start(create_app(parse(raw, {})), sock)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions"
    try:
        async with aiohttp.ClientSession() as session:
            resp = await session.post(
                url, data=body("stall-mid"), headers={"Authorization": f"Bearer {API_KEY}"}
            )
            await resp.content.readline()
            resp.close()
            await eventually(lambda: upstream.cancelled == 1)
    finally:
        await runner.cleanup()


async def test_start_serves_through_the_guarded_site(upstream, monkeypatch):
    monkeypatch.setattr(serve, "max_connections", lambda: 7)
    sock = serve.listen("127.0.0.1", 0, 30)
    runner = await serve.start(create_app(parse(gateway_config(upstream.url), {})), sock,
                               read_timeout_s=4.5)
    try:
        (site,) = runner.sites
        assert isinstance(site, GuardedSite)
        assert (site.read_timeout_s, site.max_connections, site.max_head_bytes) == (
            4.5, 7, serve.MAX_HEAD_BYTES
        )
        assert site.name == f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()
