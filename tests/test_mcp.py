"""MCP tools against a real MCP server (the SDK's own MCPServer over streamable HTTP)."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError as ServerToolError
from mcp_types import CallToolResult, ImageContent, TextContent

import llmgate.tools.mcp as mcp_module
from llmgate.tools.base import MAX_RESULT, ToolError, ToolSpec
from llmgate.tools.mcp import McpServer, McpTool, result_text


class Recorder:
    """What the server saw, shared with the test thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.cancel_seen = threading.Event()

    def add(self, items: list[Any], item: Any) -> None:
        with self.lock:
            items.append(item)


def make_mcp(rec: Recorder) -> MCPServer:
    mcp = MCPServer("test-tools")

    @mcp.tool()
    async def echo(text: str) -> str:
        """Say the text back."""
        return f"echo: {text}"

    @mcp.tool()
    async def fail(reason: str) -> str:
        """Always fails."""
        raise ServerToolError(f"cannot do it: {reason}")

    @mcp.tool()
    async def nap(seconds: float, tag: str = "") -> str:
        """Sleep, then answer."""
        rec.add(rec.started, tag)
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            rec.add(rec.cancelled, tag)
            rec.cancel_seen.set()
            raise
        return f"slept {tag}"

    @mcp.tool()
    async def whoami(ctx: Context) -> str:
        """Report the request's headers."""
        headers = dict(ctx.headers or {})
        rec.add(rec.headers, headers)
        return "ok"

    @mcp.tool()
    async def big() -> str:
        """A result longer than the model gets."""
        return "x" * (MAX_RESULT + 100)

    return mcp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slow_cancellations(app: Any, delay: float) -> Any:
    """ASGI wrapper: a POSTed notifications/cancelled is answered only after `delay` s."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await app(scope, receive, send)
            return
        messages: list[dict[str, Any]] = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        if any(b"notifications/cancelled" in m.get("body", b"") for m in messages):
            await asyncio.sleep(delay)

        async def replay() -> dict[str, Any]:
            return messages.pop(0) if messages else await receive()

        await app(scope, replay, send)

    return wrapped


class ServerThread:
    """uvicorn serving an MCPServer on 127.0.0.1 in a thread of its own (its own loop)."""

    def __init__(self, port: int | None = None, cancel_delay: float = 0.0) -> None:
        self.port = port or free_port()
        self.rec = Recorder()
        app = make_mcp(self.rec).streamable_http_app()
        if cancel_delay:
            app = slow_cancellations(app, cancel_delay)
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="critical",
            lifespan="on",
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}/mcp"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def served() -> Iterator[ServerThread]:
    server = ServerThread().start()
    yield server
    server.stop()


async def connected(url: str, **kwargs: Any) -> McpServer:
    kwargs.setdefault("headers", {"Authorization": "Bearer sekret-token"})
    kwargs.setdefault("allowed", None)
    kwargs.setdefault("timeout_s", 2.0)
    server = McpServer("tools", url, **kwargs)
    await server.start()
    await wait_for_tools(server)
    return server


async def wait_for_tools(server: McpServer, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not server.tools():
            await asyncio.sleep(0.01)


def tool(server: McpServer, name: str) -> McpTool:
    return next(t for t in server.tools() if t.spec.name == name)


async def test_lists_tools_and_filters_them(served: ServerThread) -> None:
    server = await connected(served.url)
    try:
        by_name = {t.spec.name: t for t in server.tools()}
        assert set(by_name) == {"echo", "fail", "nap", "whoami", "big"}
        echo = by_name["echo"]
        assert echo.server is server
        assert echo.spec.description == "Say the text back."
        assert echo.spec.parameters["type"] == "object"
        assert echo.spec.parameters["properties"]["text"]["type"] == "string"
        assert echo.spec.parameters["required"] == ["text"]
        assert "seconds" in by_name["nap"].spec.parameters["properties"]
    finally:
        await server.aclose()

    only = await connected(served.url, allowed=["echo", "nap", "not-there"])
    try:
        assert sorted(t.spec.name for t in only.tools()) == ["echo", "nap"]
    finally:
        await only.aclose()


async def test_call_results_errors_and_timeout(served: ServerThread) -> None:
    server = await connected(served.url, timeout_s=0.3)
    try:
        assert await tool(server, "echo").call({"text": "hi"}, {}) == "echo: hi"

        with pytest.raises(ToolError) as failed:
            await tool(server, "fail").call({"reason": "no fuel"}, {})
        message = str(failed.value)  # MCPServer prefixes "Error executing tool fail: "
        assert message.startswith("tool fail failed: ")
        assert message.endswith("cannot do it: no fuel")

        served.rec.cancel_seen.clear()
        started = time.monotonic()
        with pytest.raises(ToolError) as slow:
            await tool(server, "nap").call({"seconds": 5, "tag": "late"}, {})
        assert str(slow.value) == "tool nap timed out after 0.3 s"
        assert time.monotonic() - started < 0.6
        # the timed-out call was cancelled on the server, and the session still works
        assert await asyncio.to_thread(served.rec.cancel_seen.wait, 0.5)
        assert "late" in served.rec.cancelled
        assert await tool(server, "echo").call({"text": "again"}, {}) == "echo: again"

        long = await tool(server, "big").call({}, {})
        assert len(long) < MAX_RESULT + 50 and long.endswith("[result cut]")
    finally:
        await server.aclose()


async def test_headers_reach_the_server(served: ServerThread) -> None:
    server = await connected(served.url)
    try:
        whoami = tool(server, "whoami")
        await whoami.call({}, {"X-Turn-Id": "turn-7", "Authorization": "Bearer intruder"})
        await whoami.call({}, {"X-Bad": "line\r\nbreak"})
        first, second = served.rec.headers[-2:]
        assert first["x-turn-id"] == "turn-7"
        assert first["authorization"] == "Bearer sekret-token"  # configured headers win
        assert "x-turn-id" not in second and "x-bad" not in second  # per call, dropped if bad
        assert second["authorization"] == "Bearer sekret-token"
    finally:
        await server.aclose()


async def test_parallel_calls_overlap(served: ServerThread) -> None:
    server = await connected(served.url)
    try:
        nap = tool(server, "nap")
        started = time.monotonic()
        results = await asyncio.gather(
            *(nap.call({"seconds": 0.3, "tag": f"p{i}"}, {}) for i in range(3))
        )
        elapsed = time.monotonic() - started
        assert sorted(results) == ["slept p0", "slept p1", "slept p2"]
        assert elapsed < 0.6, elapsed
    finally:
        await server.aclose()


async def test_cancelled_call_stops_at_once_and_server_is_told(served: ServerThread) -> None:
    server = await connected(served.url, timeout_s=10.0)  # no timeout does the cancelling
    try:
        served.rec.cancel_seen.clear()
        call = asyncio.create_task(tool(server, "nap").call({"seconds": 5, "tag": "hangup"}, {}))
        async with asyncio.timeout(2):
            while "hangup" not in served.rec.started:
                await asyncio.sleep(0.01)
        started = time.monotonic()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert time.monotonic() - started < 0.1
        assert await asyncio.to_thread(served.rec.cancel_seen.wait, 1)
        assert "hangup" in served.rec.cancelled
        assert await tool(server, "echo").call({"text": "still here"}, {}) == "echo: still here"
    finally:
        await server.aclose()


async def test_legacy_protocol_cancels_with_notifications_promptly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pre-2026 server is told by notifications/cancelled, one POST after the other: with
    a slow server, three calls cancelled at once (a barge-in) must not wait for those POSTs."""
    monkeypatch.setattr(mcp_module, "Client", functools.partial(mcp_module.Client, mode="legacy"))
    slow = ServerThread(cancel_delay=0.2).start()
    server = await connected(slow.url, timeout_s=10.0)
    try:
        nap = tool(server, "nap")
        calls = [
            asyncio.create_task(nap.call({"seconds": 5, "tag": f"c{i}"}, {})) for i in range(3)
        ]
        async with asyncio.timeout(2):
            while len(slow.rec.started) < 3:
                await asyncio.sleep(0.01)
        started = time.monotonic()
        for call in calls:
            call.cancel()
        for call in calls:
            with pytest.raises(asyncio.CancelledError):
                await call
        assert time.monotonic() - started < 0.1
        async with asyncio.timeout(3):
            while len(slow.rec.cancelled) < 3:
                await asyncio.sleep(0.02)
        assert sorted(slow.rec.cancelled) == ["c0", "c1", "c2"]
        assert await tool(server, "echo").call({"text": "legacy"}, {}) == "echo: legacy"
    finally:
        await server.aclose()
        await asyncio.to_thread(slow.stop)


async def test_server_down_at_start_then_up(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    later = ServerThread(port)
    server = McpServer(
        "later",
        f"{later.url}?token=query-secret",
        {"Authorization": "Bearer sekret-token"},
        None,
        timeout_s=2.0,
        retry_s=0.1,
    )
    caplog.set_level(logging.DEBUG, logger="llmgate.tools")
    try:
        started = time.monotonic()
        await server.start()
        assert time.monotonic() - started < 0.05
        assert server.tools() == []
        async with asyncio.timeout(3):
            while not any(r.levelno >= logging.WARNING for r in caplog.records):
                await asyncio.sleep(0.01)
        warning = next(r for r in caplog.records if r.levelno >= logging.WARNING)
        message = warning.getMessage()
        assert "later" in message and "unavailable" in message
        assert "\n" not in message and warning.exc_info is None
        assert "query-secret" not in message and "sekret" not in message
        with pytest.raises(ToolError, match="tool server 'later' is unavailable"):
            await McpTool(ToolSpec("echo"), server).call({"text": "x"}, {})

        await asyncio.sleep(0.3)  # a few retries: still one warning, not one per retry
        assert sum(r.levelno >= logging.WARNING for r in caplog.records) == 1

        await asyncio.to_thread(later.start)
        await wait_for_tools(server, 3)
        assert await tool(server, "echo").call({"text": "up"}, {}) == "echo: up"
        for record in caplog.records:
            if not record.name.startswith("llmgate"):
                continue  # the SDK's own debug lines show the URL: they are not ours
            assert "sekret" not in record.getMessage()
            assert "query-secret" not in record.getMessage()
    finally:
        await server.aclose()
        await asyncio.to_thread(later.stop)


async def test_server_lost_then_back() -> None:
    port = free_port()
    first = ServerThread(port).start()
    server = await connected(first.url, retry_s=0.2)
    second = ServerThread(port)
    echo = tool(server, "echo")
    try:
        await asyncio.to_thread(first.stop)
        with pytest.raises(ToolError, match="tool server 'tools' is unavailable"):
            await echo.call({"text": "x"}, {})
        assert server.tools() == []
        await asyncio.to_thread(second.start)
        async with asyncio.timeout(5):
            while True:
                try:
                    assert await echo.call({"text": "y"}, {}) == "echo: y"
                    break
                except ToolError:
                    await asyncio.sleep(0.05)
    finally:
        await server.aclose()
        await asyncio.to_thread(second.stop)


async def test_aclose_leaves_nothing_behind(served: ServerThread) -> None:
    before = {t for t in asyncio.all_tasks() if not t.done()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        server = await connected(served.url)
        pending = asyncio.create_task(tool(server, "nap").call({"seconds": 5, "tag": "close"}, {}))
        await asyncio.sleep(0.1)
        await server.aclose()
        with pytest.raises(ToolError, match="tool server 'tools' is unavailable"):
            await pending  # not a CancelledError: nobody cancelled the caller
        await asyncio.sleep(0)
        left = {t for t in asyncio.all_tasks() if not t.done()} - before
        assert left == set(), left
        assert server.tools() == []
        with pytest.raises(ToolError, match="unavailable"):
            await McpTool(ToolSpec("echo"), server).call({"text": "x"}, {})
        del server, pending
        gc.collect()
    assert [str(w.message) for w in caught] == []


async def test_aclose_while_down_or_connecting_is_quick() -> None:
    """Refused, and a listener that never answers (the handshake hangs): aclose is at once."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # never accepted: connect succeeds, no answer ever comes
        before = {t for t in asyncio.all_tasks() if not t.done()}
        for port in (free_port(), silent.getsockname()[1]):
            server = McpServer("down", f"http://127.0.0.1:{port}/mcp", {}, None, 1.0, 10)
            await server.start()
            await asyncio.sleep(0.1)
            started = time.monotonic()
            await server.aclose()
            assert time.monotonic() - started < 0.5
            await asyncio.sleep(0)
            assert {t for t in asyncio.all_tasks() if not t.done()} - before == set()


def test_result_text_shapes() -> None:
    texts = CallToolResult(content=[TextContent(text="a"), TextContent(text="b")])
    assert result_text(texts) == "a\nb"
    image = ImageContent(data="AAAA", mime_type="image/png")
    assert result_text(CallToolResult(content=[TextContent(text="see"), image])) == "see\n[image]"
    structured = CallToolResult(content=[], structured_content={"temp": 21, "city": "Köln"})
    assert result_text(structured) == '{"temp": 21, "city": "Köln"}'
