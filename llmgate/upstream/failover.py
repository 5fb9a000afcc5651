"""A turn's upstream answer from whichever of its plan's targets first sends a token.

    provider_call  the innermost Call of a staged route (and of a plain route whose model
                   is an alias of several targets): OPENED, then the winner's chunks
    complete       a plain route's non-streamed answer, from its one target

Before the first token a provider's failure (`UpstreamError.fallback`: refused, reset, 429,
5xx, no first token in time, an unset ${VAR}) moves the turn to the next target at once: no
sleep on the voice path. With `hedge_after_ms`, a target that has sent no token by then gets
company: the next one starts too, the first to send a token wins, and the other is cancelled,
its connection closed. At most two are in flight. After the first token nothing moves: a
failure ends the answer (with an apology, where `server.on_stream_error` asks for one).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from llmgate.errors import ApiError, UpstreamUnavailable
from llmgate.obs import tracing
from llmgate.pipeline import OPENED, Ask, Opened, Piece, apologize, chunk_head
from llmgate.protocol import encoder
from llmgate.upstream.call import UpstreamCall
from llmgate.upstream.targets import Attempts, Target

log = logging.getLogger("llmgate.upstream")

FIRST = asyncio.FIRST_COMPLETED
_Won = list[Any]  # [target, its pieces, the first piece's view], once a target has won


async def provider_call(ask: Ask) -> AsyncIterator[Piece | Opened]:
    attempts = Attempts(ask.plan, ask.turn)
    won: _Won = []
    start = _one if len(ask.plan.targets) == 1 else _race
    try:
        async with aclosing(start(ask, attempts, won)) as first:
            async for item in first:  # raises when every target failed
                yield item
    except BaseException:  # closed (a hang-up) just as a target won: its call ends too
        if won:
            await won[1].aclose()
        raise
    target, pieces, view = won
    finished = False
    try:
        async with aclosing(pieces):
            async for piece in pieces:
                view = piece.view
                finished = finished or piece.finish_reason is not None
                yield piece
    except ApiError as exc:
        attempts.died(target, exc)
        if ask.apology is None:
            raise
        # Said here, inside the stages, so that a speech or audio stage speaks it too.
        for chunk in apologize(ask.turn, exc, ask.apology, finished, chunk_head(ask, view)):
            yield Piece.of(chunk, whole=True)  # its own sentence, not the cut one's end


async def _attempt(ask: Ask, target: Target) -> AsyncIterator[Piece | Opened]:
    body = encoder.encode(ask.plan.body(ask.body, target))
    call = UpstreamCall(ask.session, target.provider, body, ask.caller_key, ask.turn)
    try:
        # The span covers the request until the provider's 200 (the rest of the answer
        # is read in whichever task wins, and a span must end in the task it began in).
        with tracing.span("upstream.attempt", provider=target.provider.name, model=target.model):
            await call.open()
        yield OPENED
        async with aclosing(call.pieces()) as pieces:
            async for piece in pieces:
                yield piece
    finally:
        call.close()


async def _one(ask: Ask, attempts: Attempts, won: _Won) -> AsyncIterator[Piece | Opened]:
    """A plan of one target: no tasks, no race."""
    target = await attempts.next()
    assert target is not None
    pieces = _attempt(ask, target)
    try:
        async for item in pieces:
            if isinstance(item, Piece):
                attempts.won(target)
                won += (target, pieces, item.view)
            yield item
            if won:
                return
        raise _ended(target)
    except ApiError as exc:
        attempts.failed(target, exc)
        raise
    finally:
        if not won:
            await pieces.aclose()
            attempts.close()


async def _race(ask: Ask, attempts: Attempts, won: _Won) -> AsyncIterator[Piece | Opened]:
    """Targets in turn, at most two at once when hedging, until one sends a chunk.

    The caller's headers (OPENED) wait for that chunk: until then every failure may still
    move the turn, and a turn whose every target failed gets a status of its own (on which
    Agora's engine speaks its `failure_message`), not an error frame after a 200."""
    loop = asyncio.get_running_loop()
    hedge = ask.plan.hedge_after_s
    width = 2 if hedge else 1
    racing: dict[asyncio.Task, tuple[Target, AsyncIterator[Piece | Opened]]] = {}
    hedge_at = 0.0

    async def start() -> bool:
        nonlocal hedge_at
        target = await attempts.next()
        if target is None:
            return False
        pieces = _attempt(ask, target)
        racing[asyncio.create_task(_next(pieces))] = (target, pieces)
        hedge_at = loop.time() + (hedge or 0.0)
        return True

    to_close: list[AsyncIterator[Piece | Opened]] = []  # done with, not yet closed
    try:
        await start()
        while racing:
            timeout = None
            if hedge and len(racing) < width and attempts.queue:
                timeout = max(0.0, hedge_at - loop.time())
            done, _ = await asyncio.wait(racing, timeout=timeout, return_when=FIRST)
            if not done:  # no token yet: the next target starts as well
                attempts.hedges += 1
                await start()
                continue
            winner: tuple[Target, AsyncIterator[Piece | Opened], Piece] | None = None
            for task in [t for t in racing if t in done]:  # in the order they started
                target, pieces = racing.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    to_close.append(pieces)
                    attempts.failed(target, _ended(target))
                    continue
                except ApiError as exc:  # (bound by `except`, so no cycle through its frame)
                    to_close.append(pieces)
                    attempts.failed(target, exc)
                    if not exc.fallback:
                        raise  # the caller's own mistake: another target would say the same
                    continue
                if not isinstance(item, Piece):  # its 200: wait for its first chunk
                    racing[asyncio.create_task(_next(pieces))] = (target, pieces)
                elif winner is None:
                    winner = (target, pieces, item)
                else:
                    to_close.append(pieces)  # a chunk, but later than the winner's
            if winner is not None:
                target, pieces, item = winner
                attempts.won(target)
                won += (target, pieces, item.view)
                yield OPENED
                yield item
                return
            if not racing:
                await start()  # the next at once; with hedging, the one after waits its turn
        raise attempts.error()
    finally:
        # The verdicts first: a second cancellation during the waits below must not leave
        # a half-open circuit's probe marked as running.
        attempts.close()
        for task in racing:
            task.cancel()
        try:
            if racing:
                await asyncio.wait(racing)
        finally:
            for pieces in [*to_close, *(p for _, p in racing.values())]:
                await pieces.aclose()  # a lost target's connection is closed, not pooled


async def _next(pieces: AsyncIterator[Piece | Opened]) -> Piece | Opened:
    return await anext(pieces)


def _ended(target: Target) -> ApiError:
    return UpstreamUnavailable(
        f"provider '{target.provider.name}' ended the stream before its first chunk"
    )


async def complete(ask: Ask) -> bytes:
    """A plain route's non-streamed answer from its one target: the provider's JSON as it
    came. (A plan of several targets is collected from `provider_call` instead.)"""
    attempts = Attempts(ask.plan, ask.turn)
    target = await attempts.next()
    assert target is not None and len(ask.plan.targets) == 1
    body = encoder.encode(ask.plan.body(ask.body, target))
    call = UpstreamCall(ask.session, target.provider, body, ask.caller_key, ask.turn, False)
    try:
        with tracing.span("upstream.attempt", provider=target.provider.name, model=target.model):
            await call.open()
            raw = await call.answer()
        attempts.won(target)
        return raw
    except ApiError as exc:
        attempts.failed(target, exc)
        raise
    finally:
        call.close()
        attempts.close()  # a verdict-less end (a hang-up, say) is recorded as cancelled
