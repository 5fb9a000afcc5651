"""Limits per caller key: streams in flight and requests per minute, and streams in flight
in all; over a limit, a 429 with Retry-After before any upstream work.

The state lives behind `LimitState` (two calls: `admit`, which gives a slot, and `release`),
kept in this process by `LocalLimits`, or shared by several through Redis
(`llmgate.state.redis`).

Requests per minute are a GCRA (the generic cell rate algorithm, as in redis-cell): each
key keeps one time, when its budget is next whole; a burst of N is let through at once,
then one request every 60/N s. A 429's Retry-After is then at most 60/N s and always enough,
and the state is one number a key (one value for a shared store to check and set at once).
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections.abc import Callable
from typing import Any, Protocol

from llmgate.errors import ApiError
from llmgate.server.auth import Caller

WINDOW_S = 60.0


class LimitState(Protocol):
    max_concurrent: int  # streams in flight in this process, its most (a reload may change it)

    async def admit(self, caller: Caller) -> Any:
        """Take a slot for `caller` (returned, for `release`), or raise a 429 ApiError
        saying when to come back."""

    async def release(self, slot: Any) -> None:
        """Give back a slot `admit` gave (the turn ended, however it ended); never waits
        on a shared store."""


class LocalLimits:
    """In-process limits."""

    def __init__(self, max_concurrent: int, clock: Callable[[], float] = time.monotonic):
        self.max_concurrent = max_concurrent
        self.active = 0
        self._clock = clock
        self._in_flight: dict[str, int] = {}
        self._full_at: dict[str, float] = {}  # name -> when its budget is whole again (GCRA)

    async def admit(self, caller: Caller) -> Caller:
        self.check(caller)
        self.take(caller)
        return caller

    def check(self, caller: Caller, in_flight: bool = True) -> None:
        """A 429 if `caller` may not start a stream now, else its request is counted against
        its rate (with `in_flight` False, only this process's own bound is looked at: a
        shared store counts the rest)."""
        name, rule = caller.name, caller.rule
        if self.active >= self.max_concurrent:
            raise limited(f"llmgate has {self.active} streams in flight, its most", 1)
        if not in_flight:
            return
        most = rule.max_concurrent
        if most is not None and self._in_flight.get(name, 0) >= most:
            raise limited(f"key '{name}' has {most} streams in flight, its most", 1)
        rate = rule.requests_per_minute
        if rate is not None:
            now = self._clock()
            step = WINDOW_S / rate
            full_at = max(self._full_at.get(name, now), now) + step
            if full_at - now > WINDOW_S + 1e-9:  # more than a minute's budget in use
                raise limited(
                    f"key '{name}' is over its {rate} requests a minute", full_at - WINDOW_S - now
                )
            self._full_at[name] = full_at

    def take(self, caller: Caller) -> None:
        self._in_flight[caller.name] = self._in_flight.get(caller.name, 0) + 1
        self.active += 1

    async def release(self, slot: Caller) -> None:
        self.give_back(slot)

    def give_back(self, caller: Caller) -> None:
        self.active -= 1
        left = self._in_flight[caller.name] - 1
        if left:
            self._in_flight[caller.name] = left
        else:
            del self._in_flight[caller.name]


def open_files() -> int | None:
    """The process's (soft) open-file limit; None when there is none."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def default_global_max() -> int:
    """Streams in flight in all when config.toml sets none: what the open-file limit holds
    (a stream holds two descriptors, the caller's and the provider's), some kept back."""
    soft = open_files()
    return 100_000 if soft is None else max(16, (soft - 128) // 2)


def raise_open_files() -> None:
    """Lift the soft open-file limit to the hard one (1,024 by default on many systems,
    while the hard limit allows far more): every stream holds two descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def limited(message: str, wait_s: float) -> ApiError:
    retry = max(1, math.ceil(wait_s))
    return ApiError(429, f"{message}; retry after {retry}s", headers={"Retry-After": str(retry)})

