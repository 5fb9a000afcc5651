"""A turn's metadata mapped to an HTTP tool's header: a value with a control character
(which no header may hold, and aiohttp refuses to send) leaves that header out, with a
warning naming the header and never the value; the tool is called all the same."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web

from llmgate.config import HttpToolConfig
from llmgate.tools.http import HttpTool


@pytest.mark.parametrize("bad", ["room\x007", "\x1b[31mred", "a\x7f", "line\x0bfeed", "x\x1f"])
async def test_a_control_character_drops_its_header_not_the_call(aiohttp_server, caplog, bad):
    seen: list[dict[str, str]] = []

    async def weather(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"forecast": "sunny"})

    app = web.Application()
    app.router.add_post("/weather", weather)
    server = await aiohttp_server(app)
    config = HttpToolConfig(url=str(server.make_url("/weather")), headers={"X-Key": "k"})
    tool = HttpTool("weather", config)
    caplog.set_level(logging.WARNING, logger="llmgate.tools")
    try:
        result = await tool.call(
            {"city": "Paris"}, {"X-Channel": bad, "X-User": "u-1", "X-Tabbed": "a\tb"}
        )
    finally:
        await tool.aclose()
    assert result == '{"forecast": "sunny"}'
    [headers] = seen
    assert "X-Channel" not in headers
    assert (headers["X-User"], headers["X-Tabbed"], headers["X-Key"]) == ("u-1", "a\tb", "k")
    [warning] = [r for r in caplog.records if r.name == "llmgate.tools"]
    assert warning.levelno == logging.WARNING
    assert "X-Channel" in warning.getMessage() and bad not in warning.getMessage()
