"""A per-turn timer that ends a wait on a provider that makes no progress."""

from __future__ import annotations

import asyncio
from types import TracebackType

from llmgate.errors import UpstreamTimeout


class Watchdog:
    """Cancels the current task when `progress()` was not called for `limit` seconds.

    Cheaper than rescheduling a timeout on every read: the hot path only stores a time,
    and the timer re-arms itself lazily when it fires early. On expiry the cancellation
    becomes UpstreamTimeout; a cancellation from elsewhere (client gone) passes through.
    While `paused` (we are waiting on the caller, not the provider) it never expires.
    """

    __slots__ = ("_handle", "_last", "_limit", "_loop", "_message", "_task", "expired", "paused")

    def __init__(self, limit: float, message: str) -> None:
        self._limit = limit
        self._message = message
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._last = 0.0
        self.expired = False
        self.paused = False

    def __enter__(self) -> Watchdog:
        self._task = asyncio.current_task()
        self._last = self._loop.time()
        self._handle = self._loop.call_at(self._last + self._limit, self._check)
        return self

    def progress(self) -> None:
        self._last = self._loop.time()

    def rearm(self, limit: float, message: str) -> None:
        """Switch to a new limit (first token -> idle), counted from now."""
        self._limit, self._message = limit, message
        self._last = self._loop.time()
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop.call_at(self._last + limit, self._check)

    def _check(self) -> None:
        if self.paused:
            self._last = self._loop.time()
        due = self._last + self._limit
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        self.expired = True
        if self._task is not None:
            self._task.cancel()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if (
            self.expired
            and exc_type is asyncio.CancelledError
            and self._task is not None
            and self._task.uncancel() == 0
        ):
            raise UpstreamTimeout(self._message) from exc
