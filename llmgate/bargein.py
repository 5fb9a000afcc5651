"""Barge-in by turn_id: a newer turn on an Agora channel ends an older one still running."""

from __future__ import annotations

import asyncio

from aiohttp import web

from llmgate.agora import channel_key
from llmgate.turn import Turn


class Channels:
    """Barge-in by turn_id: a newer turn on an Agora channel ends an older one still running.

    Agora's engine numbers turns per channel (`turn_id`, vendor "custom"); a request with a
    higher number means the user has moved on, so the older turn's upstream request is
    cancelled even if its connection is still open. Requests without a channel or a
    turn_id are left alone. A channel is one caller key's: a tenant who knows another's
    channel name cannot silence its agent.
    """

    def __init__(self) -> None:
        self._live: dict[str, tuple[int, Turn, asyncio.Task]] = {}

    def enter(self, turn: Turn) -> str | None:
        channel, number = channel_key(turn.metadata), turn.metadata.get("turn_id")
        task = asyncio.current_task()
        if channel is None or type(number) is not int or task is None:
            return None
        key = f"{turn.key}|{channel}"
        live = self._live.get(key)
        if live is not None:
            if live[0] > number:
                return None  # an older turn arriving late supersedes nothing
            if live[0] < number and not live[2].done():
                live[1].superseded = True
                live[2].cancel()
        self._live[key] = (number, turn, task)
        return key

    def leave(self, key: str | None, turn: Turn) -> None:
        if key is not None and key in self._live and self._live[key][1] is turn:
            del self._live[key]


CHANNELS = web.AppKey("channels", Channels)
