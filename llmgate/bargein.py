"""Barge-in by turn_id: a newer turn on an Agora channel ends an older one still running.

    BargeIn        the interface a handler uses: `enter` a turn, `leave` it when it ends
    Channels       this process's turns by channel (the whole of it without [state])
    SharedChannels the same, and every newer turn announced to the other processes, whose
                   older turns of that channel end as a local barge-in does (llmgate.state)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from llmgate.agora import channel_key
from llmgate.turn import Turn


class BargeIn(Protocol):
    async def enter(self, turn: Turn) -> str | None:
        """Register `turn` on its channel, ending an older turn of it; its key, or None."""

    async def leave(self, key: str | None, turn: Turn) -> None:
        """The turn ended (however it ended)."""


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

    async def enter(self, turn: Turn) -> str | None:
        return self.register(turn)[0]

    async def leave(self, key: str | None, turn: Turn) -> None:
        if key is not None and key in self._live and self._live[key][1] is turn:
            del self._live[key]

    def register(self, turn: Turn) -> tuple[str | None, int]:
        """(the turn's channel key or None, its turn_id)."""
        channel, number = channel_key(turn.metadata), turn.metadata.get("turn_id")
        task = asyncio.current_task()
        if channel is None or type(number) is not int or task is None:
            return None, 0
        key = f"{turn.key}|{channel}"
        live = self._live.get(key)
        if live is not None:
            if live[0] > number:
                return None, number  # an older turn arriving late supersedes nothing
            self.supersede(key, number)
        self._live[key] = (number, turn, task)
        return key, number

    def supersede(self, key: str, number: int) -> None:
        """Turn `number` of channel `key` began (here or on another process): an older one
        running here ends; one of that number or newer is left alone (a late or repeated
        message must not end the next turn)."""
        live = self._live.get(key)
        if live is not None and live[0] < number and not live[2].done():
            live[1].superseded = True
            live[2].cancel()


class SharedChannels:
    """This process's channels, each newer turn also announced (`announce(key, number)`,
    which never waits on the shared store) so that every other process supersedes too."""

    def __init__(self, local: Channels, announce: Callable[[str, int], None]) -> None:
        self.local = local
        self._announce = announce

    async def enter(self, turn: Turn) -> str | None:
        key, number = self.local.register(turn)
        if key is not None:
            self._announce(key, number)
        return key

    async def leave(self, key: str | None, turn: Turn) -> None:
        await self.local.leave(key, turn)
