"""A caller that leaves while llmgate writes is a 499 like any other hang-up, whichever
write notices it: its headers, a stage's first words, a chunk, the end of the stream."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest

from llmgate.server.stream import SSEResponse
from tests.conftest import API_KEY

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
ROUTES = [{"path": "/chat/completions"}, {"path": "/speech/chat/completions", "speech": True}]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/speech/chat/completions"])
@pytest.mark.parametrize("point", ["headers", "first", "second", "end"])
async def test_a_caller_gone_at_any_write_is_a_499(make_gateway, monkeypatch, caplog, path, point):
    caplog.set_level(logging.INFO, logger="llmgate")
    writes = {"n": 0}
    prepare, write, write_eof = SSEResponse.prepare, SSEResponse.write, SSEResponse.write_eof

    def gone(request) -> None:  # the caller's socket closes just before this write
        request.transport.close()

    async def prepare_gone(self, request):
        self._request_seen = request
        if point == "headers":
            gone(request)
        return await prepare(self, request)

    async def write_gone(self, data):
        writes["n"] += 1
        if (point, writes["n"]) in (("first", 1), ("second", 2)):
            gone(self._request_seen)
        return await write(self, data)

    async def eof_gone(self, data=b""):
        if point == "end":
            gone(self._request_seen)
        return await write_eof(self, data)

    monkeypatch.setattr(SSEResponse, "prepare", prepare_gone)
    monkeypatch.setattr(SSEResponse, "write", write_gone)
    monkeypatch.setattr(SSEResponse, "write_eof", eof_gone)
    gateway = await make_gateway(routes=ROUTES)
    body = {"model": "slow-words", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:
        try:
            async with session.post(gateway.make_url(path), json=body, headers=HEADERS) as resp:
                await resp.read()
        except aiohttp.ClientError:
            pass
    for _ in range(100):  # the turn's line comes once its handler has ended
        turns = [r for r in caplog.records if r.name == "llmgate.turn"]
        if turns:
            break
        await asyncio.sleep(0.02)
    assert [t.turn["status"] for t in turns] == [499], [t.turn for t in turns]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
