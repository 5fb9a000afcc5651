"""Server-side tools that live on an MCP server, reached over streamable HTTP.

The `mcp` SDK does the protocol, either era: a 2026-07-28 server (stateless: `server/discover`,
no session, `Mcp-Method` / `Mcp-Name` headers) or an older one (the `initialize` handshake and
a session); the SDK probes which. It runs on anyio, whose transport and session context
managers must be entered and left by one task, so each `McpServer` owns its connection in one
long-lived background task (`_run`): it connects, lists the tools, then waits until the list
must be fetched again or the connection is lost or closed, and reconnects every `retry_s`
seconds while the server is down.

The list is fetched again when the server says it changed (`notifications/tools/list_changed`,
reaching the session's message handler: on the GET stream of an older server's session, or on
a `subscriptions/listen` stream that llmgate opens to a 2026-07-28 server) and when a
2026-07-28 listing's `ttlMs` runs out. What one server adds to every request is bounded:
at most `max_tools` tools, descriptions cut to `max_description_chars`, a tool whose input
schema is over `max_schema_bytes` left out; one warning names what was cut.

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
import msgspec
from mcp import Client, MCPError
from mcp.client import IncomingMessage
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ListenNotSupportedError
from mcp_types import (
    CONNECTION_CLOSED,
    METHOD_NOT_FOUND,
    REQUEST_TIMEOUT,
    AudioContent,
    CallToolResult,
    EmbeddedResource,
    ImageContent,
    Implementation,
    ResourceLink,
    TextContent,
    Tool,
    ToolListChangedNotification,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from llmgate.http import compressed
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
MIN_RELIST_GAP = 1.0  # seconds between two listings at least, however often a server says so
MIN_TTL = 1.0  # seconds: a shorter positive ttlMs is taken as this
MAX_TOOLS = 32  # tools taken from one server (defaults of [tools.NAME]'s keys)
MAX_DESCRIPTION_CHARS = 1024  # a longer description is cut
MAX_SCHEMA_BYTES = 8192  # a tool whose input schema is longer (as JSON) is left out
_NAMES_SHOWN = 5  # tool names a warning lists

# Per-call headers. The SDK's public call_tool() takes no headers, but its streamable HTTP
# transport posts each message in the sender's contextvars context, so a variable set by the
# calling task is seen by the httpx2 request hook below, which adds them to that POST only.
_call_headers: ContextVar[dict[str, str] | None] = ContextVar("llmgate_mcp_headers", default=None)

_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HEADER_VALUE = re.compile(r"^[\t\x20-\x7e]*$")


MAX_ANSWER = 8 * 2**20  # bytes of one JSON answer of an MCP server (a tool list, a result)


class _BoundedStream(httpx2.AsyncByteStream):
    """A response body that fails past `limit` bytes instead of being held whole."""

    def __init__(self, inner: httpx2.AsyncByteStream, limit: int) -> None:
        self._inner = inner
        self._limit = limit

    async def __aiter__(self):  # type: ignore[override]
        size = 0
        async for part in self._inner:
            size += len(part)
            if size > self._limit:
                raise httpx2.ReadError(f"answer over {self._limit} bytes")
            yield part

    async def aclose(self) -> None:
        await self._inner.aclose()


class _BoundedTransport(httpx2.AsyncBaseTransport):
    """The SDK reads a JSON answer whole: each is bounded here, and none is inflated (a
    compressed answer fails). An event stream is the SDK's to bound (by event)."""

    def __init__(self, limit: int = MAX_ANSWER) -> None:
        self._inner = httpx2.AsyncHTTPTransport()
        self._limit = limit

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._inner.handle_async_request(request)
        if compressed(response.headers):
            await response.aclose()
            raise httpx2.ReadError("a compressed answer (identity was asked)")
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            stream = response.stream
            assert isinstance(stream, httpx2.AsyncByteStream)
            response.stream = _BoundedStream(stream, self._limit)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


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


class McpUnavailable(Exception):
    """The server's first connection failed; the message says why, and is safe to show: no
    URL query, no header value."""


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


class _Cuts:
    """What one listing left out or cut."""

    def __init__(self) -> None:
        self.over = 0  # tools past max_tools
        self.more = False  # and pages not fetched
        self.schemas: list[str] = []  # left out: input schema over max_schema_bytes
        self.descriptions: list[str] = []  # cut to max_description_chars

    def describe(self, server: McpServer) -> str | None:
        parts = []
        if self.over or self.more:
            over = f"{self.over}{'+' if self.more else ''}"  # +: pages left unfetched
            parts.append(f"{over} tools past max_tools = {server.max_tools} left out")
        if self.schemas:
            parts.append(
                f"{len(self.schemas)} left out for an input schema over max_schema_bytes = "
                f"{server.max_schema_bytes} ({_names(self.schemas)})"
            )
        if self.descriptions:
            parts.append(
                f"{len(self.descriptions)} descriptions cut to max_description_chars = "
                f"{server.max_description_chars} ({_names(self.descriptions)})"
            )
        return "; ".join(parts) if parts else None


def _names(names: list[str]) -> str:
    shown = ", ".join(name[:64] for name in names[:_NAMES_SHOWN])
    return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")


async def _first_set(*events: asyncio.Event, timeout: float | None = None) -> asyncio.Event | None:
    """The first of the events to be set (the first given when several are), or None when
    the timeout ran out first."""
    for event in events:
        if event.is_set():
            return event
    waits = {asyncio.ensure_future(event.wait()): event for event in events}
    try:
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    return next((event for event in events if event.is_set()), None) if done else None


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
        *,
        max_tools: int = MAX_TOOLS,
        max_description_chars: int = MAX_DESCRIPTION_CHARS,
        max_schema_bytes: int = MAX_SCHEMA_BYTES,
        once: bool = False,
    ) -> None:
        """`once`: a probe's connection (`llmgate check`): one attempt, never retried, its
        failure not logged but told by `first_listing`."""
        self.name = name
        self.url = url
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.max_tools = max_tools
        self.max_description_chars = max_description_chars
        self.max_schema_bytes = max_schema_bytes
        self.protocol_version: str | None = None  # the current connection's
        self.once = once
        self._headers = dict(headers)  # may hold an Authorization header: never logged
        self._allowed = None if allowed is None else list(allowed)
        self._tools: list[McpTool] = []
        self._relist = asyncio.Event()  # the server said its list changed
        self._stale_at: float | None = None  # when the listing's ttlMs runs out
        self._cuts_told: str | None = None  # the last warning about cut tools
        self._client: Client | None = None
        self._runner: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[str]] = set()
        self._wake = asyncio.Event()  # ends the wait between two connection attempts
        self._lost = asyncio.Event()  # ends the current connection
        self._closing = False
        self._down = False  # a warning was logged and the server has not answered since
        self._served = False  # the current connection attempt got as far as listing the tools
        self._last_attempt = 0.0
        self._first_answer = asyncio.Event()  # the first attempt listed the tools, or failed
        self._first_tools: list[McpTool] = []
        self._first_failure: str | None = None

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

    async def first_listing(self) -> list[McpTool]:
        """The tools the first connection listed, once it has (after `start()`); McpUnavailable
        when that attempt failed, or the server was closed first. What a one-off probe asks
        (`llmgate check`); later connections change nothing here."""
        await self._first_answer.wait()
        if self._first_failure is not None:
            raise McpUnavailable(self._first_failure)
        return list(self._first_tools)

    async def aclose(self) -> None:
        """Stop the calls, end the session (it tells the server), and end the background task."""
        self._closing = True
        self._tell_first("closed before the server answered")
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
            if self._closing or self.once:
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
            headers={**self._headers, "Accept-Encoding": "identity"},
            timeout=timeout,
            event_hooks={"request": [_add_call_headers]},
            transport=_BoundedTransport(),
        ) as http:
            client = Client(
                streamable_http_client(self.url, http_client=http),
                read_timeout_seconds=CONNECT_TIMEOUT,
                cache=None,  # the listing is ours to keep (ttlMs honoured below)
                message_handler=self._on_message,
                client_info=Implementation(name="llmgate", version=_VERSION),
            )
            async with client:
                self.protocol_version = client.protocol_version
                self._relist.clear()
                tools = await self._list_tools(client)
                if self._closing:
                    return
                self._served = True
                self._tools = tools
                self._client = client
                self._tell_first(tools)
                log.info(
                    "MCP server %r%s: %d tools (protocol %s)",
                    self.name,
                    " is back" if self._down else "",
                    len(tools),
                    self.protocol_version,
                )
                self._down = False
                listener = None
                if self.protocol_version in MODERN_PROTOCOL_VERSIONS:
                    listener = asyncio.create_task(self._listen(client), name="mcp listen")
                try:
                    await self._keep_listed(client, lost)
                finally:
                    self._client = None
                    self._tools = []
                    if listener is not None:
                        listener.cancel()
                        await asyncio.wait({listener})

    async def _keep_listed(self, client: Client, lost: asyncio.Event) -> None:
        """Until the connection is lost: list the tools again when the server says they
        changed or the listing's ttlMs ran out, at most once every MIN_RELIST_GAP."""
        loop = asyncio.get_running_loop()
        while True:
            timeout = None if self._stale_at is None else max(0.0, self._stale_at - loop.time())
            if await _first_set(lost, self._relist, timeout=timeout) is lost:
                return
            self._relist.clear()
            try:
                tools = await self._list_tools(client)
            except MCPError as exc:
                if exc.code == CONNECTION_CLOSED:
                    raise
                log.warning(
                    "MCP server %r: tools not listed again (%s); the last list stays",
                    self.name,
                    self._describe(exc),
                )
                self._stale_at = loop.time() + self.retry_s  # and try again then
            else:
                if self._closing:
                    return
                before, self._tools = self._tools, tools
                if [t.spec for t in before] != [t.spec for t in tools]:
                    log.info("MCP server %r: %d tools, listed again", self.name, len(tools))
            if await _first_set(lost, timeout=MIN_RELIST_GAP) is lost:
                return

    async def _on_message(self, message: IncomingMessage) -> None:
        """The session's message handler: a changed tool list is listed again by the owner
        task (a request from inside the SDK's receive path could wait on itself)."""
        if isinstance(message, ToolListChangedNotification):
            self._relist.set()

    async def _listen(self, client: Client) -> None:
        """2026-07-28: ask for tools/list_changed on a subscriptions/listen stream (its events
        reach `_on_message`); a stream that ends is opened again and the list fetched again,
        since what changed meanwhile was not told."""
        gap = MIN_RETRY_GAP
        opened = False
        while not self._closing:
            try:
                async with client.listen(tools_list_changed=True) as subscription:
                    if not subscription.honored.tools_list_changed:
                        return  # the server will not tell: ttlMs alone keeps the list fresh
                    if opened:
                        self._relist.set()
                    opened, gap = True, MIN_RETRY_GAP
                    async for _event in subscription:
                        pass  # delivered to _on_message too
            except ListenNotSupportedError:
                return
            except MCPError as exc:
                if exc.code == METHOD_NOT_FOUND:
                    return
                log.debug("MCP server %r: listen ended: %s", self.name, self._describe(exc))
            except Exception as exc:  # a stream lost: SubscriptionLost, a transport error
                log.debug("MCP server %r: listen ended: %s", self.name, self._describe(exc))
            await asyncio.sleep(gap)
            gap = min(gap * 2, max(self.retry_s, MIN_RETRY_GAP))

    async def _list_tools(self, client: Client) -> list[McpTool]:
        """The server's tools, the caps applied; pages are followed only until enough are
        taken. The first page's ttlMs (2026-07-28) sets when the list is fetched again."""
        found: list[McpTool] = []
        cuts = _Cuts()
        cursor: str | None = None
        loop = asyncio.get_running_loop()
        for page_no in range(MAX_PAGES):
            page = await client.list_tools(cursor=cursor)
            if page_no == 0:
                ttl = page.ttl_ms / 1000 if page.ttl_ms else None
                self._stale_at = None if ttl is None else loop.time() + max(ttl, MIN_TTL)
            for tool in page.tools:
                if self._allowed is not None and tool.name not in self._allowed:
                    continue
                if len(found) >= self.max_tools:
                    cuts.over += 1
                    continue
                spec = self._spec(tool, cuts)
                if spec is not None:
                    found.append(McpTool(spec, self))
            cursor = page.next_cursor
            if cursor is None:
                break
            if len(found) >= self.max_tools:
                cuts.more = True  # the rest is not fetched
                break
        if self._allowed is not None and not cuts.more:
            missing = sorted(set(self._allowed) - {tool.spec.name for tool in found})
            if missing:
                log.warning("MCP server %r does not offer: %s", self.name, ", ".join(missing))
        self._tell_cuts(cuts)
        return found

    def _spec(self, tool: Tool, cuts: _Cuts) -> ToolSpec | None:
        """What the model sees of one tool: None when its schema is too big to send."""
        schema = dict(tool.input_schema)
        try:
            size = len(msgspec.json.encode(schema))
        except (TypeError, msgspec.EncodeError):
            size = self.max_schema_bytes + 1
        if size > self.max_schema_bytes:
            cuts.schemas.append(tool.name)
            return None
        description = tool.description or ""
        if len(description) > self.max_description_chars:
            cuts.descriptions.append(tool.name)
            description = description[: self.max_description_chars]
        return ToolSpec(tool.name, description, schema, server=self.name)

    def _tell_cuts(self, cuts: _Cuts) -> None:
        """One warning naming the server and what was cut; not again for the same cuts."""
        told = cuts.describe(self)
        if told is not None and told != self._cuts_told:
            log.warning("MCP server %r: %s", self.name, told)
        self._cuts_told = told

    def _tell_first(self, outcome: list[McpTool] | str) -> None:
        """What `first_listing` says: the first attempt's tools, or why it failed."""
        if self._first_answer.is_set():
            return
        if isinstance(outcome, str):
            self._first_failure = outcome
        else:
            self._first_tools = list(outcome)
        self._first_answer.set()

    def _report_failure(self, exc: BaseException) -> None:
        """One warning line when the server goes down; the retries after it log at debug."""
        if self._closing:
            return
        what = self._describe(exc)
        self._tell_first(what)
        if self.once:
            return  # first_listing tells it
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
