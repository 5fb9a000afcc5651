"""Server-side tools that live on an MCP server, reached over streamable HTTP.

The `mcp` SDK does the protocol. It runs on anyio, whose transport and session context
managers must be entered and left by one task, so each `McpServer` owns its connection in one
long-lived background task (`_run`): it connects, lists the tools, then parks until the
connection is lost or closed, and reconnects every `retry_s` seconds while the server is down.

Tool calls come from other tasks (one per turn, several in parallel) and go straight through
the shared `mcp.Client`: its JSON-RPC dispatcher correlates concurrent requests by id, and the
streamable HTTP transport posts each request from its own task, so that is safe.

Each call's work runs in a task of its own that `McpTool.call` awaits through a shield: a
hang-up (cancellation) or a timeout returns at once, while the abandoned task is cancelled and
tells the server in the background. On the 2026-07-28 protocol the SDK aborts the request's
POST (that is the protocol's cancellation); on older ones it sends `notifications/cancelled`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import re
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx2
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp_types import (
    CONNECTION_CLOSED,
    REQUEST_TIMEOUT,
    AudioContent,
    CallToolResult,
    EmbeddedResource,
    ImageContent,
    Implementation,
    ResourceLink,
    TextContent,
)

from llmgate.tools.base import ToolError, ToolSpec, bounded

log = logging.getLogger("llmgate.tools")

try:
    _VERSION = importlib.metadata.version("llmgate")
except importlib.metadata.PackageNotFoundError:
    _VERSION = "0"

MAX_ERROR = 500  # characters of a failed tool's text the model is told
MAX_PAGES = 100  # tools/list pages followed, so a paginator that never ends cannot hang us
CONNECT_TIMEOUT = 10.0  # seconds for the handshake and tools/list of one connection attempt
CLOSE_TIMEOUT = 3.0  # seconds aclose() waits for the session to end before cancelling it
MIN_RETRY_GAP = 1.0  # seconds between attempts at least, whatever wakes the retry

# Per-call headers. The SDK's public call_tool() takes no headers, but its streamable HTTP
# transport posts each message in the sender's contextvars context, so a variable set by the
# calling task is seen by the httpx2 request hook below, which adds them to that POST only.
_call_headers: ContextVar[dict[str, str] | None] = ContextVar("llmgate_mcp_headers", default=None)

_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HEADER_VALUE = re.compile(r"^[\t\x20-\x7e]*$")


async def _add_call_headers(request: httpx2.Request) -> None:
    """httpx2 request hook: the calling turn's headers, never over the SDK's or configured ones."""
    extra = _call_headers.get()
    if not extra:
        return
    for name, value in extra.items():
        if name not in request.headers:
            request.headers[name] = value


def _valid_headers(headers: dict[str, str]) -> dict[str, str]:
    """Only well-formed headers: a bad one would make httpx2 fail inside the SDK's transport
    task, which takes the whole connection down, not just this call."""
    return {
        name: value
        for name, value in headers.items()
        if isinstance(name, str)
        and isinstance(value, str)
        and _HEADER_NAME.match(name)
        and _HEADER_VALUE.match(value)
    }


def _short(text: str, limit: int = MAX_ERROR) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _safe_url(url: str) -> str:
    """The URL without user info, query or fragment: those may hold secrets."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<bad url>"


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups, as anyio task groups raise."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def result_text(result: CallToolResult) -> str:
    """A tool result as text for the model: its text items, placeholders for the rest, or its
    structured content as JSON when it has no text."""
    texts: list[str] = []
    others: list[str] = []
    for item in result.content:
        if isinstance(item, TextContent):
            texts.append(item.text)
        elif isinstance(item, ImageContent):
            others.append("[image]")
        elif isinstance(item, AudioContent):
            others.append("[audio]")
        elif isinstance(item, ResourceLink | EmbeddedResource):
            others.append("[resource]")
        else:
            others.append(f"[{getattr(item, 'type', 'content')}]")
    if not texts and result.structured_content is not None:
        texts.append(json.dumps(result.structured_content, ensure_ascii=False, default=str))
    return "\n".join(texts + others)


class McpTool:
    """One tool of an MCP server, as the model sees it; calls go through its server."""

    def __init__(self, spec: ToolSpec, server: McpServer) -> None:
        self.spec = spec
        self.server = server

    def __repr__(self) -> str:
        return f"McpTool({self.spec.name!r}, server={self.server.name!r})"

    async def call(self, arguments: dict[str, Any], headers: dict[str, str]) -> str:
        """The tool's result; ToolError on failure, timeout or an unreachable server.

        The work runs in its own task, awaited through a shield, so that a cancellation (the
        caller hung up) or the timeout returns at once: the SDK's own cancel path waits for
        the transport to take the cancellation, which we do not want to wait for.
        """
        server = self.server
        work = server.spawn_call(self.spec.name, arguments, headers)
        try:
            async with asyncio.timeout(server.timeout_s):
                return await asyncio.shield(work)
        except TimeoutError:
            raise ToolError(
                f"tool {self.spec.name} timed out after {server.timeout_s:g} s"
            ) from None
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if work.cancelled() and me is not None and not me.cancelling():
                # aclose() ended the work, nobody cancelled us: a failure, not a cancellation
                raise ToolError(f"tool server '{server.name}' is unavailable") from None
            raise
        finally:
            if not work.done():
                work.cancel()  # it tells the server, in the background


class McpServer:
    """A connection to one MCP server and the tools it offers."""

    def __init__(
        self,
        name: str,
        url: str,
        headers: dict[str, str],
        allowed: list[str] | None,
        timeout_s: float,
        retry_s: float = 30.0,
    ) -> None:
        self.name = name
        self.url = url
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._headers = dict(headers)  # may hold an Authorization header: never logged
        self._allowed = None if allowed is None else list(allowed)
        self._tools: list[McpTool] = []
        self._client: Client | None = None
        self._runner: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[str]] = set()
        self._wake = asyncio.Event()  # ends the wait between two connection attempts
        self._lost = asyncio.Event()  # ends the current connection
        self._closing = False
        self._down = False  # a warning was logged and the server has not answered since
        self._served = False  # the current connection attempt got as far as listing the tools
        self._last_attempt = 0.0

    def __repr__(self) -> str:
        return f"McpServer({self.name!r}, {_safe_url(self.url)!r})"

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect in the background: start-up never waits for, or fails on, the server."""
        if self._runner is not None or self._closing:
            return
        try:
            self._runner = asyncio.create_task(self._run(), name=f"mcp server {self.name}")
        except Exception as exc:  # no running loop, or worse: never fail start-up
            log.warning("MCP server %r not started: %s", self.name, type(exc).__name__)

    def tools(self) -> list[McpTool]:
        """The tools listed at the last connection ([] until the server has answered)."""
        return list(self._tools)

    async def aclose(self) -> None:
        """Stop the calls, end the session (it tells the server), and end the background task."""
        self._closing = True
        calls = list(self._calls)
        for task in calls:
            task.cancel()
        if calls:
            await asyncio.wait(calls, timeout=CLOSE_TIMEOUT)
        self._lost.set()
        self._wake.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            if self._client is None:
                runner.cancel()  # connecting or waiting to retry: no session to end cleanly
            _, pending = await asyncio.wait({runner}, timeout=CLOSE_TIMEOUT)
            if pending:
                runner.cancel()
                await asyncio.wait({runner}, timeout=CLOSE_TIMEOUT)
            if runner.done() and not runner.cancelled():
                runner.exception()  # retrieved (it catches its errors; this is belt and braces)
        self._tools = []
        self._client = None

    # -- the owner task --------------------------------------------------------------------

    async def _run(self) -> None:
        """Connect, serve until the connection ends, wait, and again, until closed."""
        loop = asyncio.get_running_loop()
        while not self._closing:
            self._wake.clear()
            self._last_attempt = loop.time()
            self._served = False
            try:
                await self._connect_and_serve()
            except Exception as exc:
                self._report_failure(exc)
            finally:
                self._client = None
            if self._closing:
                break
            if self._served and loop.time() - self._last_attempt >= MIN_RETRY_GAP:
                continue  # a working connection was lost: try again at once, then every retry_s
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.retry_s):
                    await self._wake.wait()

    async def _connect_and_serve(self) -> None:
        """One connection: list the tools, then hold the session until it is lost or closed.

        A broken transport ends it too: the SDK's task group then cancels the wait below and
        raises the transport's error out of `async with client`."""
        lost = self._lost = asyncio.Event()
        timeout = httpx2.Timeout(
            30.0, connect=CONNECT_TIMEOUT, read=max(300.0, self.timeout_s + 30.0)
        )
        async with httpx2.AsyncClient(
            headers=self._headers, timeout=timeout, event_hooks={"request": [_add_call_headers]}
        ) as http:
            client = Client(
                streamable_http_client(self.url, http_client=http),
                read_timeout_seconds=CONNECT_TIMEOUT,
                cache=None,
                client_info=Implementation(name="llmgate", version=_VERSION),
            )
            async with client:
                tools = await self._list_tools(client)
                if self._closing:
                    return
                self._served = True
                self._tools = tools
                self._client = client
                if self._down:
                    log.info("MCP server %r is back: %d tools", self.name, len(tools))
                else:
                    log.info("MCP server %r: %d tools", self.name, len(tools))
                self._down = False
                try:
                    await lost.wait()
                finally:
                    self._client = None
                    self._tools = []

    async def _list_tools(self, client: Client) -> list[McpTool]:
        found: list[McpTool] = []
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            page = await client.list_tools(cursor=cursor)
            for tool in page.tools:
                if self._allowed is None or tool.name in self._allowed:
                    spec = ToolSpec(tool.name, tool.description or "", dict(tool.input_schema))
                    found.append(McpTool(spec, self))
            cursor = page.next_cursor
            if cursor is None:
                break
        if self._allowed is not None:
            missing = sorted(set(self._allowed) - {tool.spec.name for tool in found})
            if missing:
                log.warning("MCP server %r does not offer: %s", self.name, ", ".join(missing))
        return found

    def _report_failure(self, exc: BaseException) -> None:
        """One warning line when the server goes down; the retries after it log at debug."""
        if self._closing:
            return
        what = self._describe(exc)
        if self._down:
            log.debug("MCP server %r still unavailable: %s", self.name, what)
            return
        self._down = True
        self._tools = []
        log.warning(
            "MCP server %r (%s) is unavailable: %s; retrying every %g s",
            self.name,
            _safe_url(self.url),
            what,
            self.retry_s,
        )

    def _describe(self, exc: BaseException) -> str:
        """A short, safe description of a connection error: no URL query, no header value."""
        exc = _leaf(exc)
        if isinstance(exc, httpx2.HTTPStatusError):
            return f"HTTP {exc.response.status_code}"
        if isinstance(exc, MCPError):
            text = f"MCP error {exc.code}: {exc.message}"
        else:
            text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        text = text.replace(self.url, _safe_url(self.url))
        for value in self._headers.values():
            if len(value) >= 4:
                text = text.replace(value, "***")
        return _short(" ".join(text.split()), 200)

    def _connection_lost(self, client: Client) -> None:
        """A call found the connection broken: end it, so the owner task reconnects."""
        if client is self._client and not self._closing:
            log.warning("MCP server %r: connection lost; reconnecting", self.name)
            self._down = True
            self._client = None
            self._tools = []
            self._lost.set()

    def _request_reconnect(self) -> None:
        """A call found no connection: retry now rather than at the end of retry_s."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_attempt >= min(MIN_RETRY_GAP, self.retry_s):
            self._wake.set()

    # -- calls -------------------------------------------------------------------------------

    def spawn_call(
        self, name: str, arguments: dict[str, Any], headers: dict[str, str]
    ) -> asyncio.Task[str]:
        """Start a call in a task of its own, tracked so aclose() can end it."""
        task = asyncio.create_task(self._call(name, arguments, headers), name=f"mcp call {name}")
        self._calls.add(task)
        task.add_done_callback(self._call_done)
        return task

    def _call_done(self, task: asyncio.Task[str]) -> None:
        self._calls.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: an abandoned call's error is no "never retrieved" warning

    async def _call(self, name: str, arguments: dict[str, Any], headers: dict[str, str]) -> str:
        client = self._client
        if client is None or self._closing:
            if not self._closing:
                self._request_reconnect()
            raise ToolError(f"tool server '{self.name}' is unavailable")
        extra = _valid_headers(headers) if headers else {}
        if extra:
            _call_headers.set(extra)  # this task's own context: no reset needed
        try:
            # McpTool.call times the call out; the SDK's read timeout is only a backstop
            result = await client.call_tool(
                name, arguments, read_timeout_seconds=self.timeout_s + 1.0
            )
        except MCPError as exc:
            if exc.code == REQUEST_TIMEOUT:
                raise ToolError(f"tool {name} timed out after {self.timeout_s:g} s") from None
            if exc.code == CONNECTION_CLOSED or exc.message == "Session terminated":
                self._connection_lost(client)
                raise ToolError(f"tool server '{self.name}' is unavailable") from None
            raise ToolError(f"tool {name} failed: {_short(exc.message)}") from None
        except (httpx2.HTTPError, OSError):
            self._connection_lost(client)
            raise ToolError(f"tool server '{self.name}' is unavailable") from None
        except Exception as exc:  # a result the SDK rejects, an input request we cannot answer
            log.debug("MCP tool %r on %r: %s", name, self.name, type(exc).__name__)
            raise ToolError(f"tool {name} failed: {type(exc).__name__}") from None
        text = result_text(result)
        if result.is_error:
            raise ToolError(f"tool {name} failed: {_short(text)}")
        return bounded(text)
