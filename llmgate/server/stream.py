"""A streamed turn: our headers once the provider said 200, its frames relayed as they
came (server/relay.py), everything one read completed in one write, failures as frames.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from llmgate.errors import ApiError, UpstreamUnavailable
from llmgate.server.relay import Relay, UpstreamErrorFrame
from llmgate.sse import DONE_FRAME, SSEError
from llmgate.turn import CLIENT_CLOSED, SUPERSEDED, Turn
from llmgate.upstream.provider import (
    FOREIGN_ERRORS,
    MAX_ERROR_BODY,
    Provider,
    finish,
    read_bounded,
)
from llmgate.upstream.watchdog import Watchdog


class SSEResponse(EventSourceResponse):
    """aiohttp-sse's response, with a way to stop its pings that leaves no reference cycle.

    A cancelled ping task keeps its CancelledError, whose traceback holds the task's frame,
    which holds this response, which holds the task: every stream would leave a cycle for
    the garbage collector, and gen-2 collections over them paused the loop for 20-40 ms at
    200 streams. Dropping the task reference breaks the cycle; the task frees itself.
    """

    def stop_pinging(self) -> None:
        if self._ping_task is not None:
            self._ping_task.cancel()
            self._ping_task = None


async def stream_turn(
    request: web.Request,
    turn: Turn,
    keepalive_s: float,
    session: aiohttp.ClientSession,
    provider: Provider,
    body: bytes,
    caller_key: str | None,
) -> web.StreamResponse:
    first = provider.config.first_token_timeout_s
    sse: SSEResponse | None = None
    upstream: aiohttp.ClientResponse | None = None
    clean = False
    try:
        with Watchdog(first, f"provider '{provider.name}' sent nothing within {first:g}s") as wd:
            upstream = await provider.send(session, body, True, caller_key)
            if upstream.content_type == "application/json":
                raise await _json_instead_of_stream(provider, upstream)
            sse = SSEResponse(
                headers={"X-Request-Id": turn.id},
                sep="\n",
                allow_all_methods=True,
                ping_interval=keepalive_s,
                send_timeout=None,  # TCP_USER_TIMEOUT is set once on the listening socket
            )
            await sse.prepare(request)
            await pump(sse, upstream, provider, turn, wd)
            clean = True
    except ApiError as exc:
        if sse is None or not sse.prepared:
            raise
        await _fail_stream(sse, turn, exc)
    except ConnectionResetError:
        turn.status = CLIENT_CLOSED
    except asyncio.CancelledError:
        if sse is None or not sse.prepared or turn.error != SUPERSEDED:
            raise
        # A newer turn on the channel took over: end this answer cleanly, without [DONE].
        asyncio.current_task().uncancel()  # type: ignore[union-attr]
        turn.status = CLIENT_CLOSED
        with contextlib.suppress(ConnectionResetError):  # its caller may be gone as well
            await sse.write_eof()
    finally:
        if upstream is not None:
            finish(upstream, clean)
        if sse is not None:
            sse.stop_pinging()
    if sse is None:  # the caller left before our headers went out
        raise asyncio.CancelledError
    return sse


async def _fail_stream(sse: EventSourceResponse, turn: Turn, exc: ApiError) -> None:
    """After our 200: the error goes out as a data frame and the stream ends without [DONE]."""
    turn.failed(exc.status, exc.code or exc.type)
    if isinstance(exc, UpstreamErrorFrame):
        return  # the provider's own error frame has been relayed already
    try:
        await sse.write(exc.for_request(turn.id).frame())
    except ConnectionResetError:
        turn.status = CLIENT_CLOSED


async def _json_instead_of_stream(provider: Provider, upstream: aiohttp.ClientResponse) -> ApiError:
    error = provider.answer_error(await read_bounded(upstream, MAX_ERROR_BODY))
    return error or UpstreamUnavailable(
        f"provider '{provider.name}' answered JSON where a stream was asked"
    )


async def pump(
    sse: EventSourceResponse,
    upstream: aiohttp.ClientResponse,
    provider: Provider,
    turn: Turn,
    watchdog: Watchdog,
) -> None:
    """Relay until `[DONE]`; raise ApiError for any failure (nothing written yet for it)."""
    relay = Relay(turn, provider.name)
    read = upstream.content.readany
    idle = provider.config.idle_timeout_s
    while True:
        try:
            data = await read()
            out = relay.feed(data) if data else None
        except (*FOREIGN_ERRORS, SSEError) as exc:
            raise _read_error(provider, exc) from exc
        if out is None:  # the provider closed the stream
            break
        if out:  # comments are not progress: a provider pinging forever still times out
            watchdog.progress()
            if turn.first_token is None:
                turn.mark_first_token()
                watchdog.rearm(idle, f"provider '{provider.name}' went silent for {idle:g}s")
        if relay.failure:
            if out:
                await _send(sse, out, watchdog)
            raise relay.failure
        if relay.done:  # the last frames, [DONE] and the chunked-encoding end in one send
            await _send(sse, out + DONE_FRAME, watchdog, last=True)
            return
        if out:
            await _send(sse, out, watchdog)
    if not turn.finish_reason:
        raise UpstreamUnavailable(f"provider '{provider.name}' ended the stream before finishing")
    await _send(sse, DONE_FRAME, watchdog, last=True)


async def _send(
    sse: EventSourceResponse, data: bytes, watchdog: Watchdog, last: bool = False
) -> None:
    """Write to the caller; time blocked on a slow reader is not the provider's silence."""
    watchdog.paused = True
    try:
        await (sse.write_eof(data) if last else sse.write(data))
    finally:
        watchdog.paused = False
        watchdog.progress()


def _read_error(provider: Provider, exc: BaseException) -> ApiError:
    if isinstance(exc, SSEError):
        return UpstreamUnavailable(f"provider '{provider.name}' sent an oversized SSE line")
    return provider.error_for(exc)
