"""An MCP server's answers are bounded: the SDK reads a JSON answer whole, so llmgate's
transport cuts one past MAX_ANSWER and never inflates one."""

from __future__ import annotations

import gzip

import httpx2
import pytest
from aiohttp import web

from llmgate.tools.mcp import _BoundedTransport


async def test_an_oversized_or_compressed_answer_fails_and_is_not_held(aiohttp_server):
    sent = {"bytes": 0}

    async def huge(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        try:
            for _ in range(200):  # 200 MB, chunked: no Content-Length to refuse it by
                await resp.write(b" " * 2**20)
                sent["bytes"] += 2**20
        except (ConnectionResetError, RuntimeError):
            pass
        return resp

    async def bomb(request: web.Request) -> web.Response:
        body = gzip.compress(b" " * (64 * 2**20))
        return web.Response(body=body, headers={"Content-Type": "application/json",
                                                "Content-Encoding": "gzip"})

    app = web.Application()
    app.router.add_post("/huge", huge)
    app.router.add_post("/bomb", bomb)
    server = await aiohttp_server(app)
    async with httpx2.AsyncClient(transport=_BoundedTransport(limit=2**20)) as client:
        with pytest.raises(httpx2.ReadError):
            await client.post(str(server.make_url("/huge")), content=b"{}")
        with pytest.raises(httpx2.ReadError):
            await client.post(str(server.make_url("/bomb")), content=b"{}")
    assert sent["bytes"] < 64 * 2**20  # the server was cut off, far short of 200 MB
