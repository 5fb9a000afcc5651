"""What llmgate takes from an MCP server's tool list, and when it lists again: the caps on a
hostile list, notifications/tools/list_changed, ttlMs; against real servers (the SDK's own)
of both protocol eras: 2026-07-28 (stateless) and 2025-11-25 (initialize and a session)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import mcp_types as types
import pytest
import uvicorn
from mcp.server import MCPServer, Server
from mcp.server.caching import CacheHint
from mcp.server.mcpserver import Context
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

import llmgate.tools.mcp as mcp_module
from llmgate.app import LIVE
from llmgate.tools.mcp import McpServer, McpTool
from tests.conftest import API_KEY, eventually
from tests.test_mcp import free_port

MODERN, LEGACY = "2026-07-28", "2025-11-25"


class Seen:
    """What a server was sent: each POST's JSON-RPC method and headers."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.posts: list[tuple[str, dict[str, str]]] = []
        self.lists = 0  # tools/list requests
        self.next_pages = 0  # of them, those asking for a page after the first

    def methods(self) -> list[str]:
        with self.lock:
            return [method for method, _ in self.posts]


def watched(app: Any, seen: Seen, legacy_only: bool = False) -> Any:
    """ASGI wrapper recording what was POSTed. `legacy_only`: a server of 2025-11-25, which
    knows no later revision and answers a request stamped with one as the mcp 1.x SDK's
    servers do (400, a JSON-RPC error), so that the client falls back to `initialize`."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        version = headers.get("mcp-protocol-version")
        if legacy_only and version is not None and version not in HANDSHAKE_PROTOCOL_VERSIONS:
            message = (
                f"Bad Request: Unsupported protocol version: {version}. "
                f"Supported versions: {', '.join(HANDSHAKE_PROTOCOL_VERSIONS)}"
            )
            body = {"jsonrpc": "2.0", "id": "server-error",
                    "error": {"code": types.INVALID_REQUEST, "message": message}}
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps(body).encode()})
            return
        if scope["method"] != "POST":
            await app(scope, receive, send)
            return
        messages: list[dict[str, Any]] = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        try:
            rpc = json.loads(b"".join(m.get("body", b"") for m in messages))
            method, params = rpc.get("method"), rpc.get("params") or {}
        except (ValueError, AttributeError):
            method, params = None, {}
        with seen.lock:
            seen.posts.append((method or "", headers))
            seen.lists += method == "tools/list"
            seen.next_pages += method == "tools/list" and bool(params.get("cursor"))

        async def replay() -> dict[str, Any]:
            return messages.pop(0) if messages else await receive()

        await app(scope, replay, send)

    return wrapped


class AppThread:
    """uvicorn serving an ASGI app on 127.0.0.1 in a thread of its own (its own loop)."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="critical", lifespan="on",
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}/mcp"

    def start(self) -> AppThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.should_exit = True
            self.thread.join(10)


class HugeServer(AppThread):
    """A hostile server: `count` tools of 10 KB descriptions each, 50 to a page; tool_1's
    input schema alone is 20 KB."""

    def __init__(self, count: int, ttl_ms: int = 0) -> None:
        self.seen = Seen()

        async def list_tools(ctx: Any, params: types.PaginatedRequestParams | None):
            start = int(params.cursor) if params is not None and params.cursor else 0
            tools = [self.tool(i) for i in range(start, min(start + 50, count))]
            more = str(start + 50) if start + 50 < count else None
            return types.ListToolsResult(tools=tools, next_cursor=more)

        async def call_tool(ctx: Any, params: types.CallToolRequestParams):
            return types.CallToolResult(content=[types.TextContent(text=f"{params.name} ran")])

        server = Server(
            "huge", on_list_tools=list_tools, on_call_tool=call_tool,
            cache_hints={"tools/list": CacheHint(ttl_ms=ttl_ms)},
        )
        super().__init__(watched(server.streamable_http_app(), self.seen))

    @staticmethod
    def tool(i: int) -> types.Tool:
        schema: dict[str, Any] = {"type": "object", "properties": {"q": {"type": "string"}}}
        if i == 1:
            schema["properties"]["q"]["description"] = "s" * 20_000
        return types.Tool(name=f"tool_{i}", description="d" * 10_000, input_schema=schema)


def growing_server(subscriptions: bool = True, ttl_ms: int = 0) -> MCPServer:
    """A server whose `unlock` tool adds a tool at run time and says the list changed (on
    a listen stream at 2026-07-28, on the session's stream before)."""
    hints = {"tools/list": CacheHint(ttl_ms=ttl_ms)} if ttl_ms else None
    mcp = MCPServer("growing", subscriptions=None if subscriptions else False, cache_hints=hints)

    @mcp.tool()
    async def echo(text: str) -> str:
        """Say the text back."""
        return f"echo: {text}"

    @mcp.tool()
    async def unlock(name: str, ctx: Context) -> str:
        """Add a tool."""
        add(mcp, name)
        await ctx.notify_tools_changed()  # 2026-07-28 listeners
        if ctx.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS:
            await ctx.session.send_tool_list_changed()
        return f"unlocked {name}"

    return mcp


def add(mcp: MCPServer, name: str) -> None:
    async def added(text: str) -> str:
        return f"{name}: {text}"

    mcp.add_tool(added, name=name, description=f"The {name} tool.")


@pytest.fixture(params=[MODERN, LEGACY])
def era(request: pytest.FixtureRequest) -> Iterator[tuple[str, AppThread, Seen]]:
    seen = Seen()
    app = watched(growing_server().streamable_http_app(), seen, legacy_only=request.param == LEGACY)
    thread = AppThread(app).start()
    yield request.param, thread, seen
    thread.stop()


async def connected(url: str, **kwargs: Any) -> McpServer:
    server = McpServer("crm", url, {}, None, 2.0, **kwargs)
    await server.start()
    await until(lambda: bool(server.tools()))
    return server


async def until(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def named(server: McpServer, name: str) -> McpTool:
    return next(t for t in server.tools() if t.spec.name == name)


def names(server: McpServer) -> list[str]:
    return [t.spec.name for t in server.tools()]


async def test_servers_of_both_eras_list_and_call(era) -> None:
    version, thread, seen = era
    server = await connected(thread.url)
    try:
        assert server.protocol_version == version
        assert names(server) == ["echo", "unlock"]
        assert await named(server, "echo").call({"text": "hi"}, {}) == "echo: hi"
        methods = seen.methods()
        calls = [h for m, h in seen.posts if m == "tools/call"]
        if version == MODERN:  # stateless: no handshake, no session, the method in headers
            assert "initialize" not in methods and "server/discover" in methods
            assert not any("mcp-session-id" in h for _, h in seen.posts)
            assert calls[-1]["mcp-method"] == "tools/call" and calls[-1]["mcp-name"] == "echo"
            assert calls[-1]["mcp-protocol-version"] == MODERN
        else:
            assert "initialize" in methods and calls[-1]["mcp-session-id"]
            assert calls[-1]["mcp-protocol-version"] == LEGACY
    finally:
        await server.aclose()


async def test_a_changed_list_is_listed_again_within_the_caps(era, caplog) -> None:
    _version, thread, _seen = era
    caplog.set_level(logging.INFO, logger="llmgate.tools")
    server = await connected(thread.url, max_tools=3)
    try:
        assert await named(server, "unlock").call({"name": "alpha"}, {}) == "unlocked alpha"
        await until(lambda: "alpha" in names(server))
        assert await named(server, "alpha").call({"text": "x"}, {}) == "alpha: x"
        await named(server, "unlock").call({"name": "beta"}, {})
        await until(lambda: any("max_tools" in r.getMessage() for r in caplog.records))
        assert names(server) == ["echo", "unlock", "alpha"]  # beta is past the cap
        [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warning == "MCP server 'crm': 1 tools past max_tools = 3 left out"
    finally:
        await server.aclose()


async def test_a_listing_is_fetched_again_when_its_ttl_runs_out() -> None:
    """A 2026-07-28 server that offers no listen stream: its ttlMs alone says when to ask."""
    seen = Seen()
    mcp = growing_server(subscriptions=False, ttl_ms=300)
    thread = AppThread(watched(mcp.streamable_http_app(), seen)).start()
    server = await connected(thread.url)
    try:
        assert server.protocol_version == MODERN
        add(mcp, "later")  # no notification at all
        await until(lambda: "later" in names(server), timeout=3)
        assert seen.lists >= 2
    finally:
        await server.aclose()
        thread.stop()


async def test_a_restarted_server_is_listed_again_without_waiting_for_a_call() -> None:
    """2026-07-28: the listen stream drops with the server; once it is back, the stream is
    opened again and the list fetched again (what changed meanwhile was never told)."""
    first = AppThread(growing_server().streamable_http_app()).start()
    server = await connected(first.url, retry_s=0.2)
    mcp = growing_server()
    add(mcp, "fresh")
    second = AppThread(mcp.streamable_http_app(), port=first.port)
    try:
        assert server.protocol_version == MODERN and names(server) == ["echo", "unlock"]
        await asyncio.to_thread(first.stop)
        await asyncio.to_thread(second.start)
        await until(lambda: "fresh" in names(server), timeout=5)
    finally:
        await server.aclose()
        second.stop()


async def test_a_huge_tool_list_is_capped_and_told_once(caplog, monkeypatch) -> None:
    caplog.set_level(logging.WARNING, logger="llmgate.tools")
    monkeypatch.setattr(mcp_module, "MIN_TTL", 0.1)
    monkeypatch.setattr(mcp_module, "MIN_RELIST_GAP", 0.1)
    huge = HugeServer(count=2002, ttl_ms=100).start()
    server = await connected(huge.url, max_tools=5)
    try:
        tools = server.tools()
        assert [t.spec.name for t in tools] == ["tool_0", "tool_2", "tool_3", "tool_4", "tool_5"]
        assert all(len(t.spec.description) == 1024 for t in tools)
        assert await tools[0].call({"q": "x"}, {}) == "tool_0 ran"
        # listed again and again (ttlMs), one page each time (the 40 others are never
        # fetched), and told once all the same
        await until(lambda: huge.seen.lists >= 4)
        assert huge.seen.next_pages == 0
        [warning] = [r.getMessage() for r in caplog.records]
        assert warning == (
            "MCP server 'crm': 44+ tools past max_tools = 5 left out; "
            "1 left out for an input schema over max_schema_bytes = 8192 (tool_1); "
            "5 descriptions cut to max_description_chars = 1024 "
            "(tool_0, tool_2, tool_3, tool_4, tool_5)"
        )
    finally:
        await server.aclose()
        huge.stop()


@pytest.mark.parametrize(
    ("keys", "count", "longest"),
    [({}, 32, 1024), ({"max_tools": 8, "max_description_chars": 100}, 8, 100)],
)
async def test_a_server_of_2002_big_tools_adds_only_the_capped_few(
    make_gateway, upstream, keys, count, longest
):
    huge = HugeServer(count=2002).start()
    try:
        gateway = await make_gateway(
            providers={"fake": {"base_url": upstream.url}},
            tools={"crm": {"kind": "mcp", "url": huge.url, **keys}},
            routes=[{"path": "/tools/chat/completions", "tools": ["crm"]}],
        )
        crm = gateway.app[LIVE].current.toolbox.mcp["crm"]
        await eventually(lambda: bool(crm.tools()))
        body = {"model": "text", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        url = gateway.make_url("/tools/chat/completions")
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=headers) as r:
            assert r.status == 200
            await r.read()
        offered = [t["function"] for t in upstream.requests[0]["tools"]]
        assert len(offered) == count and "tool_1" not in {f["name"] for f in offered}
        assert max(len(f["description"]) for f in offered) == longest
        assert len(json.dumps(offered)) < count * (longest + 200)  # was 2002 x 10 KB
    finally:
        huge.stop()
