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
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from aiohttp import web

from llmgate.errors import ApiError, UpstreamUnavailable, caller_error
from llmgate.obs import clock
from llmgate.pipeline import Opened, Piece, apologize, turn_head
from llmgate.protocol import encoder
from llmgate.server.serve import SHUTDOWN
from llmgate.sse import DONE_FRAME, PING_FRAME
from llmgate.turn import CLIENT_CLOSED, Turn

log = logging.getLogger("llmgate.server")


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
        self._ending = False

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

    async def write_eof(self, data: bytes = b"") -> None:
        # aiohttp marks the body ended only once the caller drained it: a ping due in
        # between would follow the chunked end and corrupt the connection's next answer.
        self._ending = True
        self.stop_pinging()
        await super().write_eof(data)

    async def _ping(self) -> None:
        if self._ending:
            self._pinging = None
            return
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


Write = Callable[[bytes], Awaitable[None]]


class Source(Protocol):
    @property
    def finish_reason(self) -> str | None: ...

    async def open(self) -> None: ...

    async def relay(self, write: Write) -> bytes: ...

    async def aclose(self) -> None: ...


def shutting_down() -> ApiError:
    """What a turn the drain cut is told (a 503 Agora speaks its failure message on)."""
    message = "llmgate is shutting down (server.drain_s passed); ask again"
    return ApiError(503, message, code="shutdown", headers={"Retry-After": "1"})


def require_finish(finish_reason: str | None, provider: str | None) -> None:
    """An answer that ended without a finish_reason was cut off: a dead provider must not
    look like a finished answer."""
    if not finish_reason:
        raise UpstreamUnavailable(f"provider '{provider}' ended the stream before finishing")


async def stream_answer(
    request: web.Request,
    turn: Turn,
    keepalive_s: float,
    source: Source,
    apology: str | None = None,
) -> web.StreamResponse:
    sse: SSEResponse | None = None
    try:
        await source.open()
        sse = SSEResponse(turn.id, keepalive_s)
        try:
            await sse.prepare(request)  # our headers: the first write the caller can miss
        except ConnectionResetError:
            raise CallerGone from None
        await _pump(sse, turn, source)
    except CallerGone:
        turn.end(CLIENT_CLOSED)
    except asyncio.CancelledError as exc:
        if sse is not None and exc.args == (SHUTDOWN,):
            # The drain cut it: the caller is told, in the envelope, rather than cut off.
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            await source.aclose()
            await _fail(sse, turn, shutting_down().for_request(turn.id), None, False)
            return sse
        if sse is None or not turn.superseded:
            raise
        # A newer turn on the channel took over: end this answer cleanly, without [DONE].
        asyncio.current_task().uncancel()  # type: ignore[union-attr]
        turn.end(CLIENT_CLOSED)
        await source.aclose()
        with contextlib.suppress(CallerGone):  # its caller may be gone as well
            await _write(sse, b"", last=True)
    except Exception as exc:
        if sse is None:
            raise  # before our headers: the handler answers it
        # After our 200 a status cannot follow: the failure becomes the stream's end.
        await source.aclose()  # the provider is done with: no watchdog while we write
        error = caller_error(exc, turn.id, f"in the stream of {turn.id}")
        await _fail(sse, turn, error, apology, source.finish_reason is not None)
    finally:
        await source.aclose()
        if sse is not None:
            sse.stop_pinging()
    return sse


async def _pump(sse: SSEResponse, turn: Turn, source: Source) -> None:
    """Write what the source gives until it ends; ApiError for any failure."""

    async def write(data: bytes) -> None:
        if turn.first_token is None:
            turn.mark_first_token()
        await _write(sse, data)

    last = await source.relay(write)
    if last and turn.first_token is None:
        turn.mark_first_token()
    if source.finish_reason:  # the last frames, [DONE] and the chunked end in one send
        if turn.timing:  # the turn's clock, asked for: a comment line SSE clients skip
            last += clock.comment(turn)
        await _write(sse, last + DONE_FRAME, last=True)
        return
    if last:
        await _write(sse, last)
    require_finish(source.finish_reason, turn.provider)


async def _write(sse: SSEResponse, data: bytes, last: bool = False) -> None:
    try:
        await (sse.write_eof(data) if last else sse.write(data))
    except ConnectionResetError:
        raise CallerGone from None


async def _fail(
    sse: SSEResponse, turn: Turn, exc: ApiError, apology: str | None, finished: bool
) -> None:
    """After our 200: the error goes out as a data frame and the stream ends without
    [DONE]; or, with `apology`, the caller hears it and the answer ends as a normal one
    (once the answer had finished, with [DONE] alone)."""
    if apology is not None:
        head = turn_head(turn, turn.model or "")
        chunks = apologize(turn, exc, apology, finished, head)
        data = b"".join(b"data: " + encoder.encode(c) + b"\n\n" for c in chunks)
        with contextlib.suppress(CallerGone):
            await _write(sse, data + DONE_FRAME, last=True)
        return
    turn.end(exc.status, exc.code or exc.type)
    with contextlib.suppress(CallerGone):  # the provider's failure, whether or not it is heard
        await _write(sse, exc.frame())


class Staged:
    """A staged route's Call, read by the writer the way it reads a plain UpstreamCall.

    The pieces of one provider read go out in one write (`Piece.more`), as the plain
    route's do: a write per chunk cost more than everything else a chunk costs. Should a
    stage drop the last piece of a read, what was held is written as soon as the turn's
    task waits, by a task of its own (never later than that)."""

    __slots__ = ("_flushing", "_held", "_items", "_later", "_pending", "finish_reason")

    def __init__(self, items: AsyncIterator[Piece | Opened]) -> None:
        self._items = items
        self._held: Piece | None = None
        self._pending: list[bytes] = []  # frames of a read whose last piece is still to come
        self._later: asyncio.Handle | None = None
        self._flushing: asyncio.Task | None = None
        self.finish_reason: str | None = None

    async def open(self) -> None:
        """Wait until the answer begins: the provider said 200, or a stage spoke first."""
        async for item in self._items:
            if isinstance(item, Piece):
                self._held = item
            return

    async def relay(self, write: Write) -> bytes:
        """The pieces, a read's together; what is held when the answer ends is returned,
        for the writer's last write."""
        try:
            if self._held is not None:
                await self._write(self._held, write)
                self._held = None
            async for item in self._items:
                if isinstance(item, Piece):
                    await self._write(item, write)
        except Exception:
            # What came before the failure goes out before it is told (the last words of
            # an answer cut after them, its finish): a later read's failure never takes
            # an earlier read's chunks with it.
            self._cancel_later()
            with contextlib.suppress(CallerGone):
                await self._flushed()
                if self._pending:
                    data, self._pending = b"".join(self._pending), []
                    await write(data)
            raise
        await self._flushed()
        rest, self._pending = b"".join(self._pending), []
        self._cancel_later()
        return rest

    async def _write(self, piece: Piece, write: Write) -> None:
        finish = piece.finish_reason
        if finish:
            self.finish_reason = finish
        if piece.more or finish:  # (the end: [DONE] goes in the same write)
            self._pending.append(piece.raw)
            if self._later is None:
                loop = asyncio.get_running_loop()
                self._later = loop.call_soon(self._flush_later, write)
            return
        await self._flushed()
        if self._pending:
            self._cancel_later()
            self._pending.append(piece.raw)
            data, self._pending = b"".join(self._pending), []
            await write(data)
        else:
            await write(piece.raw)

    def _flush_later(self, write: Write) -> None:
        """The turn's task waited with frames held: they go out now."""
        self._later = None
        if self._pending:
            data, self._pending = b"".join(self._pending), []
            self._flushing = asyncio.ensure_future(_after(self._flushing, write, data))

    async def _flushed(self) -> None:
        """Held writes in flight are done before the next (their order is the stream's).
        The newest stays known until it is done: one made meanwhile chains after it."""
        while (flushing := self._flushing) is not None:
            await flushing
            if self._flushing is flushing:
                self._flushing = None

    def _cancel_later(self) -> None:
        if self._later is not None:
            self._later.cancel()
            self._later = None

    async def aclose(self) -> None:
        self._cancel_later()
        flushing, self._flushing = self._flushing, None
        if flushing is not None:
            flushing.cancel()  # the turn ends (a hang-up, a failure): its writes end too
            await asyncio.wait({flushing})
            if not flushing.cancelled():
                flushing.exception()  # (seen: the caller was gone, say)
        await self._items.aclose()  # type: ignore[attr-defined]


async def _after(before: asyncio.Task | None, write: Write, data: bytes) -> None:
    if before is not None:
        await before
    await write(data)
