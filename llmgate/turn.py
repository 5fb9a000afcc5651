"""One request's life: its id, what it asked for, how it went, its log line, its barge-in."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from aiohttp import web

log = logging.getLogger("llmgate.turn")

CLIENT_CLOSED = 499
SUPERSEDED = "superseded"  # turn.error of a turn a newer one on its channel ended


class Turn:
    __slots__ = (
        "chunks",
        "error",
        "finish_reason",
        "first_token",
        "id",
        "metadata",
        "model",
        "provider",
        "route",
        "started",
        "status",
        "stream",
        "usage",
    )

    def __init__(self, route: str) -> None:
        self.id = "req_" + os.urandom(12).hex()
        self.route = route
        self.started = time.perf_counter()
        self.model: str | None = None
        self.provider: str | None = None
        self.stream = False
        self.status = 200
        self.first_token: float | None = None
        self.chunks = 0
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.metadata: dict[str, Any] = {}

    def failed(self, status: int, error: str | None) -> None:
        """Record how the turn failed, for its log line."""
        self.status = status
        self.error = error

    def mark_first_token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter() - self.started

    def fields(self) -> dict[str, Any]:
        """The log line's fields. Never message text, never a key."""
        out: dict[str, Any] = {
            "request_id": self.id,
            "route": self.route,
            "model": self.model,
            "provider": self.provider,
            "stream": self.stream,
            "status": self.status,
            "ttft_ms": _ms(self.first_token),
            "duration_ms": _ms(time.perf_counter() - self.started),
            "chunks": self.chunks,
        }
        if self.finish_reason:
            out["finish_reason"] = self.finish_reason
        if self.usage:
            out["usage"] = {
                k: v for k, v in self.usage.items() if k.endswith("_tokens") and type(v) is int
            }
        if self.error:
            out["error"] = self.error
        if self.metadata:
            out["metadata"] = self.metadata
        return out

    def log(self) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info("turn", extra={"turn": self.fields()})


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


class Channels:
    """Barge-in by turn_id: a newer turn on an Agora channel ends an older one still running.

    Agora's engine numbers turns per channel (`turn_id`, vendor "custom"); a request with a
    higher number means the user has moved on, so the older turn's upstream request is
    cancelled even if its connection is still open. Requests without a channel or a
    turn_id are left alone.
    """

    def __init__(self) -> None:
        self._live: dict[str, tuple[int, Turn, asyncio.Task]] = {}

    def enter(self, turn: Turn) -> str | None:
        key, number = channel_key(turn.metadata), turn.metadata.get("turn_id")
        task = asyncio.current_task()
        if key is None or type(number) is not int or task is None:
            return None
        live = self._live.get(key)
        if live is not None:
            if live[0] > number:
                return None  # an older turn arriving late supersedes nothing
            if live[0] < number and not live[2].done():
                live[1].error = SUPERSEDED
                live[2].cancel()
        self._live[key] = (number, turn, task)
        return key

    def leave(self, key: str | None, turn: Turn) -> None:
        if key is not None and key in self._live and self._live[key][1] is turn:
            del self._live[key]


CHANNELS = web.AppKey("channels", Channels)


def channel_key(metadata: dict[str, Any]) -> str | None:
    """ "app/channel" from Agora's `context` object, else from `llm.params` fields."""
    context = metadata.get("context")
    context = context if isinstance(context, dict) else {}
    channel = context.get("channel") or metadata.get("channel")
    if not isinstance(channel, str) or not channel:
        return None
    app = context.get("appId") or metadata.get("app_id") or metadata.get("appId") or ""
    return f"{app}/{channel}"
