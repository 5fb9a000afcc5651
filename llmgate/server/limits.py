"""Limits per caller key: streams in flight and requests per minute, and streams in flight
in all; over a limit, a 429 with Retry-After before any upstream work.

The state lives behind `LimitState` (two calls: `admit` and `release`), kept in this process
by `LocalLimits`; several replicas would share one kept elsewhere (Redis, say).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

from llmgate.errors import ApiError
from llmgate.server.auth import Caller

WINDOW_S = 60.0


class LimitState(Protocol):
    async def admit(self, caller: Caller) -> None:
        """Take a slot for `caller`, or raise a 429 ApiError saying when to come back."""

    def release(self, caller: Caller) -> None:
        """Give back the slot `admit` took (the turn ended, however it ended)."""


class LocalLimits:
    """In-process limits. Requests per minute are counted over a sliding minute (this
    minute's count plus the last one's, weighted by how much of it the window still
    covers), which spreads a caller's budget without a timestamp per request."""

    def __init__(self, max_concurrent: int, clock: Callable[[], float] = time.monotonic):
        self.max_concurrent = max_concurrent
        self.active = 0
        self._clock = clock
        self._in_flight: dict[str, int] = {}
        self._minutes: dict[str, tuple[int, int, int]] = {}  # name -> (minute, last, this)

    async def admit(self, caller: Caller) -> None:
        name, rule = caller.name, caller.rule
        if self.active >= self.max_concurrent:
            raise _limited(f"llmgate has {self.active} streams in flight, its most", 1)
        if self._in_flight.get(name, 0) >= rule.max_concurrent:
            raise _limited(
                f"key '{name}' has {rule.max_concurrent} streams in flight, its most", 1
            )
        now = self._clock() / WINDOW_S
        minute = int(now)
        seen, last, this = self._minutes.get(name, (minute, 0, 0))
        if seen != minute:
            last, this = (this if seen == minute - 1 else 0), 0
        weight = 1.0 - (now - minute)
        if last * weight + this + 1 > rule.requests_per_minute:
            raise _limited(
                f"key '{name}' is over its {rule.requests_per_minute} requests a minute",
                _wait_s(now, minute, last, this, rule.requests_per_minute),
            )
        self._minutes[name] = (minute, last, this + 1)
        self._in_flight[name] = self._in_flight.get(name, 0) + 1
        self.active += 1

    def release(self, caller: Caller) -> None:
        self.active -= 1
        left = self._in_flight[caller.name] - 1
        if left:
            self._in_flight[caller.name] = left
        else:
            del self._in_flight[caller.name]


def _wait_s(now: float, minute: int, last: int, this: int, limit: int) -> float:
    """Seconds until one more request fits the sliding minute (`now` in minutes)."""
    if this + 1 > limit:
        # Not this minute; in the next, this minute's count is the one that fades:
        # this * (1 - f) + 1 <= limit once f of it has gone by.
        fades = max(0.0, 1.0 - (limit - 1) / this)
        return (minute + 1 + fades - now) * WINDOW_S + 0.01
    # last * (1 - (now' - minute)) + this + 1 <= limit, solved for now'
    fits = minute + 1 - (limit - this - 1) / last
    return max(0.0, fits - now) * WINDOW_S + 0.01  # past the boundary, not on it


def _limited(message: str, wait_s: float) -> ApiError:
    retry = max(1, math.ceil(wait_s))
    return ApiError(429, f"{message}; retry after {retry}s", headers={"Retry-After": str(retry)})

