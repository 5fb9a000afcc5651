"""One request to one provider, from POST to release: the only module that touches
aiohttp's ClientResponse.

    open()      POST; a non-2xx answer, or 200 with the wrong kind of body, is raised
    relay()     the plain route: each read's frames to the caller, byte for byte, peeked
    pieces()    staged routes: one Piece per SSE event, with its small decoded view
    answer()    a non-streamed answer, whole and bounded
    close()     pool the connection after a whole answer, close it after anything else

A watchdog measures the provider only: first token (or headers), then silence between
chunks; while the answer is downstream of us (a stage or the caller has it) it waits.
Every exception from aiohttp or the OS, a watchdog's expiry and an oversized SSE line
become llmgate.errors' in one place, `_translated`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import msgspec

from llmgate.errors import ApiError, UpstreamUnavailable
from llmgate.http import compressed
from llmgate.pipeline import Piece
from llmgate.protocol import ChunkView, chunk_decoder, view_decoder
from llmgate.sse import DONE, SSEDecoder, SSEError
from llmgate.turn import Turn
from llmgate.upstream.provider import Provider
from llmgate.upstream.relay import Relay, Tally
from llmgate.upstream.watchdog import Watchdog


def model_audio(data: str) -> bytes:
    """A model's own `delta.audio.data`: base64 PCM, or a failure of the provider's answer."""
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        raise UpstreamUnavailable("the provider sent audio that is not base64") from None


MAX_ERROR_BODY = 64 * 1024
MAX_ANSWER_BODY = 64 * 1024 * 1024
# What a provider call can raise besides our own errors.
FOREIGN_ERRORS = aiohttp.ClientError | OSError | asyncio.TimeoutError


class UpstreamCall:
    """One provider request. `relay()`, `pieces()` or `answer()` reads it; `close()` ends it.

    `ended` turns true when the provider's answer is whole (`[DONE]`, or a clean close).
    """

    __slots__ = (
        "_body",
        "_caller_key",
        "_first",
        "_provider",
        "_resp",
        "_sent",
        "_session",
        "_stream",
        "_tally",
        "_turn",
        "_watchdog",
        "ended",
    )

    def __init__(
        self,
        session: aiohttp.ClientSession,
        provider: Provider,
        body: bytes,
        caller_key: str | None,
        turn: Turn,
        stream: bool = True,
    ) -> None:
        self._session = session
        self._provider = provider
        self._body = body
        self._caller_key = caller_key
        self._turn = turn
        self._stream = stream
        self._resp: aiohttp.ClientResponse | None = None
        self._watchdog: Watchdog | None = None
        self._tally: Tally | None = None
        self._first = False
        self._sent = 0.0
        self.ended = False

    @property
    def finish_reason(self) -> str | None:
        return self._tally.finish_reason if self._tally is not None else None

    async def open(self) -> None:
        """Send the request; return once the provider said 200 with the body asked for."""
        provider = self._provider
        provider.check_ready()
        first = provider.config.first_token_timeout_s
        what = "sent nothing" if self._stream else "did not answer"
        self._watchdog = Watchdog(first, f"provider '{provider.name}' {what} within {first:g}s")
        self._sent = time.perf_counter()
        try:
            self._resp = resp = await self._session.post(
                provider.url,
                data=self._body,
                headers=provider.headers(self._stream, self._caller_key),
                timeout=provider.timeout,
                allow_redirects=False,
                # llmgate asks for identity; a compressed answer is refused, never inflated
                # (a small gzip of data lines would grow to gigabytes on the loop).
                auto_decompress=False,
            )
            if self._turn.timing:  # the clock's `status`: the provider's headers came
                self._turn.upstream_status = (self._sent, time.perf_counter())
            if resp.status >= 300:
                raw = await _read_bounded(resp, MAX_ERROR_BODY)
                raise provider.status_error(resp.status, resp.headers, raw)
            if compressed(resp.headers):
                raise UpstreamUnavailable(
                    f"provider '{provider.name}' sent a compressed answer (llmgate asks for "
                    "Accept-Encoding: identity)"
                )
            if self._stream and resp.content_type != "text/event-stream":
                raise await self._not_a_stream(resp)
        except BaseException as exc:
            if not self._foreign(exc):
                raise
            raise self._translated(exc) from exc

    async def _not_a_stream(self, resp: aiohttp.ClientResponse) -> ApiError:
        name = self._provider.name
        if resp.content_type == "application/json":
            error = self._provider.answer_error(await _read_bounded(resp, MAX_ERROR_BODY))
            return error or UpstreamUnavailable(
                f"provider '{name}' answered JSON where a stream was asked"
            )
        return UpstreamUnavailable(
            f"provider '{name}' answered {resp.content_type} where an event stream was asked "
            f"(check providers.{name}.base_url)"
        )

    async def relay(self, write: Callable[[bytes], Awaitable[None]]) -> bytes:
        """The plain route: each read's frames through `write` as they came, one call per
        read. Once the answer is whole, the last read's frames are returned unwritten (the
        writer sends them with its end of the stream). Raises ApiError on failure, after
        writing the good frames that came before it."""
        relay = Relay(self._provider)
        self._tally = relay.tally
        watchdog = self._watchdog
        assert watchdog is not None and self._resp is not None
        read = self._resp.content.readany
        while True:
            try:
                data = await read()
                if not data:  # the provider closed the stream
                    self.ended = True
                    return b""
                out = relay.feed(data)
            except BaseException as exc:
                if not self._foreign(exc):
                    raise
                raise self._translated(exc) from exc
            if out:  # comments, or part of a frame, are not progress
                watchdog.progress()
                if not self._first:
                    self._first_token(watchdog)
            if relay.done and relay.failure is None:
                self.ended = True
                return out
            if out:
                watchdog.paused = True  # the caller has it now
                await write(out)
                watchdog.paused = False
                watchdog.progress()
            if relay.failure is not None:
                raise relay.take_failure()

    async def pieces(self) -> AsyncIterator[Piece]:
        """Each chunk as a Piece, until `[DONE]` or a clean close; ApiError on failure."""
        watchdog = self._watchdog
        assert watchdog is not None and self._resp is not None
        read = self._resp.content.readany
        decoder = SSEDecoder()
        tally = self._tally = Tally()
        while True:
            watchdog.follow()
            try:
                data = await read()
                events = decoder.feed(data) if data else None
            except BaseException as exc:
                if not self._foreign(exc):
                    raise
                raise self._translated(exc) from exc
            if events is None:
                self.ended = True
                return
            if events:
                watchdog.progress()
                if not self._first:
                    self._first_token(watchdog)
            # A read is judged whole before any of it goes on: a failure that came in the
            # same read as chunks is seen before those chunks reach the caller, so an
            # alias falls back the same way whether the provider's bytes came together
            # or apart (after the first byte reaches the caller nothing moves).
            ready: list[Piece] = []
            done = False
            for event in events:
                payload = event.data
                if payload == DONE:
                    done = True
                    break
                view = self._view(payload)
                ready.append(Piece(event.frame(), payload, view))
            tally.note([p.view for p in ready])
            for piece in ready[:-1]:
                piece.more = True
            if not done and tally.finish_reason is None and self._resp.content.at_eof():
                # The stream's end came in this read too, unfinished: the same failure
                # the writer would find one read later, before these chunks go on.
                raise UpstreamUnavailable(
                    f"provider '{self._provider.name}' ended the stream before finishing"
                )
            for piece in ready:
                watchdog.paused = True  # a stage or the caller has it now
                yield piece
                watchdog.paused = False
                watchdog.progress()
            if done:
                self.ended = True
                return

    def _view(self, payload: bytes) -> ChunkView:
        name = self._provider.name
        try:
            view = view_decoder.decode(payload)
        except msgspec.DecodeError:
            raise UpstreamUnavailable(f"provider '{name}' sent a malformed chunk") from None
        if view.error is not None:
            raise self._provider.frame_error(payload)
        return view

    async def answer(self) -> bytes:
        """A non-streamed answer, whole; an oversized, cut-off or error answer is raised."""
        provider, watchdog, resp = self._provider, self._watchdog, self._resp
        assert watchdog is not None and resp is not None
        self._first_token(watchdog)  # the headers came: from now on, silence is the limit
        try:
            raw = await _read_bounded(resp, MAX_ANSWER_BODY, watchdog.progress)
            whole = resp.content.at_eof()
        except BaseException as exc:
            if not self._foreign(exc):
                raise
            raise self._translated(exc) from exc
        if not whole:
            raise UpstreamUnavailable(f"provider '{provider.name}' sent an oversized answer")
        try:
            raw.decode()  # invalid UTF-8 is refused on every path (upstream/relay)
            peek = chunk_decoder.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError):
            message = f"provider '{provider.name}' sent a malformed answer"
            raise UpstreamUnavailable(message) from None
        if peek.error is not None:
            raise provider.answer_error(raw) or UpstreamUnavailable(
                f"provider '{provider.name}' answered with an error"
            )
        self._tally = Tally()
        self._tally.note((peek,))
        self.ended = True
        return raw

    def _first_token(self, watchdog: Watchdog) -> None:
        """From the first token on, the limit is the silence between chunks."""
        self._first = True
        turn = self._turn
        if turn.upstream_first is None:
            now = time.perf_counter()
            turn.upstream_first = now - self._sent
            turn.model_first = now - turn.started
        idle = self._provider.config.idle_timeout_s
        watchdog.rearm(idle, f"provider '{self._provider.name}' went silent for {idle:g}s")

    # Callers raise `self._translated(exc) from exc` in place, or re-raise bare: an error
    # kept in a local of a frame its own traceback holds would make a reference cycle.
    def _foreign(self, exc: BaseException) -> bool:
        """Whether `exc` is one to translate (a cancellation: only the watchdog's own)."""
        if isinstance(exc, asyncio.CancelledError):
            return self._watchdog is not None and self._watchdog.caused_alone()
        return isinstance(exc, FOREIGN_ERRORS | SSEError)

    def _translated(self, exc: BaseException) -> ApiError:
        """The one translation of a foreign exception into ours."""
        if isinstance(exc, asyncio.CancelledError):
            assert self._watchdog is not None
            return self._watchdog.timeout_error()
        if isinstance(exc, SSEError):
            return UpstreamUnavailable(
                f"provider '{self._provider.name}' sent an oversized line or event"
            )
        return self._provider.error_for(exc)

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Pool the connection after a whole answer, close it after anything else; tally."""
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        resp, self._resp = self._resp, None
        if resp is not None:
            if self.ended:
                resp.release()
            else:
                resp.close()
            tally = self._tally
            if tally is not None and (tally.chunks or self.ended):  # not a failed attempt
                self._turn.add_round(tally.chunks, tally.finish_reason, tally.usage)


async def _read_bounded(
    resp: aiohttp.ClientResponse, limit: int, progress: Callable[[], None] | None = None
) -> bytes:
    """Up to `limit` bytes of a body; the rest is left unread."""
    parts: list[bytes] = []
    size = 0
    async for data in resp.content.iter_any():
        if progress is not None:
            progress()
        parts.append(data)
        size += len(data)
        if size >= limit:
            break
    return b"".join(parts)[:limit]
