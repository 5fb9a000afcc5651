"""Turns as they end, for the playground's live view (llmgate.server.playground): each
subscriber a bounded queue; with none, publishing costs a set's length."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from aiohttp import web

from llmgate.agora import channel_key
from llmgate.errors import ApiError
from llmgate.obs.clock import clock
from llmgate.turn import Turn

QUEUE = 256  # events a subscriber may fall behind by
MAX_SUBSCRIBERS = 16
_encode = msgspec.json.Encoder().encode


class Feed:
    """The turns that ended, to whoever listens."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[bytes]] = set()

    def publish(self, turn: Turn) -> None:
        if not self._subscribers:
            return
        event = _encode(_event(turn)).decode()
        for queue in self._subscribers:
            if queue.full():
                continue  # behind: this one loses the event
            queue.put_nowait(event)

    def subscribe(self) -> asyncio.Queue:
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            raise ApiError(429, f"the playground feed has {MAX_SUBSCRIBERS} listeners, its most",
                           headers={"Retry-After": "5"})
        queue: asyncio.Queue = asyncio.Queue(QUEUE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._subscribers.discard(queue)

    def close(self) -> None:
        """Shutting down: every listener's feed ends (a `None` last), so that an open page
        never holds the process past its drain."""
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)
        self._subscribers.clear()


FEED = web.AppKey("playground_feed", Feed)


def _event(turn: Turn) -> dict[str, Any]:
    return {
        "route": turn.route,
        "status": turn.status,
        "error": turn.error,
        "model": turn.model,
        "provider": turn.provider,
        "key": turn.key,  # the caller key's name (never the key)
        "channel": channel_key(turn.metadata),
        **clock(turn),
    }
