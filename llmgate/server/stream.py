"""The one SSE writer: our headers once the answer has begun, frames as they come, and one
end-of-stream policy for every route.

A source is the plain route's UpstreamCall (each read's frames, byte for byte) or a staged
route's Call (`Staged`, one Piece at a time). The policy: `[DONE]` only after a
finish_reason; a stream that ends without one is a failure; after our headers a failure is
one `data: {"error": ...}` frame and no `[DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Protocol

from aiohttp import web

from llmgate.errors import ApiError, UpstreamUnavailable
from llmgate.pipeline import Opened, Piece
from llmgate.sse import DONE_FRAME, PING_FRAME
from llmgate.turn import CLIENT_CLOSED, Turn
from llmgate.upstream.relay import UpstreamErrorFrame


class SSEResponse(web.StreamResponse):
    """An event stream, with our own `: ping` keep-alives.

    A ping every `keepalive_s` from one timer per stream, written by a task made only when a
    ping is due. (aiohttp-sse's response keeps a task per stream for its pings, and ending
    that task without leaving a reference cycle, which gen-2 collections pause the loop
    for, meant touching its private attributes.)
    """

    def __init__(self, request_id: str, keepalive_s: float) -> None:
        super().__init__(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "Connection": "keep-alive",
                "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
                "X-Request-Id": request_id,
            }
        )
        self._keepalive_s = keepalive_s
        self._timer: asyncio.TimerHandle | None = None
        self._pinging: asyncio.Task | None = None

    async def prepare(self, request: web.BaseRequest):  # type: ignore[override]
        first = not self.prepared  # aiohttp prepares a returned response once more
        writer = await super().prepare(request)
        if first:
            self._timer = asyncio.get_running_loop().call_later(self._keepalive_s, self._due)
        return writer

    def _due(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._keepalive_s, self._due)
        if self._pinging is None:
            self._pinging = loop.create_task(self._ping())

    async def _ping(self) -> None:
        try:
            await self.write(PING_FRAME)
        except (ConnectionResetError, RuntimeError):  # gone, or the answer ended meanwhile
            pass
        finally:
            self._pinging = None

    def stop_pinging(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class CallerGone(Exception):
    """A write to the caller failed: it closed the connection."""


class Source(Protocol):
    ended: bool

    @property
    def finish_reason(self) -> str | None: ...

    async def open(self) -> None: ...

    async def relayed(self) -> bytes: ...

    async def aclose(self) -> None: ...


def require_finish(finish_reason: str | None, provider: str | None) -> None:
    """An answer that ended without a finish_reason was cut off: a dead provider must not
    look like a finished answer."""
    if not finish_reason:
        raise UpstreamUnavailable(f"provider '{provider}' ended the stream before finishing")


def end_of_answer(finish_reason: str | None, provider: str | None) -> bytes:
    """What follows a streamed answer's last chunk."""
    require_finish(finish_reason, provider)
    return DONE_FRAME


async def stream_answer(
    request: web.Request, turn: Turn, keepalive_s: float, source: Source
) -> web.StreamResponse:
    sse: SSEResponse | None = None
    try:
        await source.open()
        sse = SSEResponse(turn.id, keepalive_s)
        await sse.prepare(request)
        await _pump(sse, turn, source)
    except ApiError as exc:
        if sse is None:
            raise
        await _fail(sse, turn, exc)
    except CallerGone:
        turn.end(CLIENT_CLOSED)
    except asyncio.CancelledError:
        if sse is None or not turn.superseded:
            raise
        # A newer turn on the channel took over: end this answer cleanly, without [DONE].
        asyncio.current_task().uncancel()  # type: ignore[union-attr]
        turn.end(CLIENT_CLOSED)
        with contextlib.suppress(CallerGone):  # its caller may be gone as well
            await _write(sse, b"", last=True)
    finally:
        await source.aclose()
        if sse is not None:
            sse.stop_pinging()
    return sse


async def _pump(sse: SSEResponse, turn: Turn, source: Source) -> None:
    """Write what the source gives until it ends; ApiError for any failure."""
    relayed = source.relayed
    while True:
        out = await relayed()
        if out and turn.first_token is None:
            turn.mark_first_token()
        if source.ended:  # the last frames, [DONE] and the chunked end in one send
            await _write(sse, out + end_of_answer(source.finish_reason, turn.provider), True)
            return
        await _write(sse, out)


async def _write(sse: SSEResponse, data: bytes, last: bool = False) -> None:
    try:
        await (sse.write_eof(data) if last else sse.write(data))
    except ConnectionResetError:
        raise CallerGone from None


async def _fail(sse: SSEResponse, turn: Turn, exc: ApiError) -> None:
    """After our 200: the error goes out as a data frame and the stream ends without [DONE]."""
    turn.end(exc.status, exc.code or exc.type)
    if isinstance(exc, UpstreamErrorFrame):
        return  # the provider's own error frame has been relayed already
    with contextlib.suppress(CallerGone):  # the provider's failure, whether or not it is heard
        await _write(sse, exc.for_request(turn.id).frame())


class Staged:
    """A staged route's Call, read by the writer the way it reads a plain UpstreamCall."""

    __slots__ = ("_held", "_items", "ended", "finish_reason")

    def __init__(self, items: AsyncIterator[Piece | Opened]) -> None:
        self._items = items
        self._held: Piece | None = None
        self.ended = False
        self.finish_reason: str | None = None

    async def open(self) -> None:
        """Wait until the answer begins: the provider said 200, or a stage spoke first."""
        self._held = await self._step()

    async def relayed(self) -> bytes:
        piece, self._held = self._held, None
        while piece is None:
            if self.ended:
                return b""
            piece = await self._step()
        finish = piece.finish_reason
        if finish:
            self.finish_reason = finish
        return piece.raw

    async def _step(self) -> Piece | None:
        try:
            item = await anext(self._items)
        except StopAsyncIteration:
            self.ended = True
            return None
        return item if isinstance(item, Piece) else None

    async def aclose(self) -> None:
        await self._items.aclose()  # type: ignore[attr-defined]
