"""A per-call timer that ends a wait on a provider that makes no progress."""

from __future__ import annotations

import asyncio

from llmgate.errors import UpstreamTimeout


class Watchdog:
    """Cancels the task that started it when `progress()` was not called for `limit` seconds.

    Cheaper than rescheduling a timeout on every read: the hot path only stores a time,
    and the timer re-arms itself lazily when it fires early. Its owner turns the
    cancellation it caused into UpstreamTimeout (`caused_alone`, `timeout_error`); a
    cancellation from elsewhere (the caller left) goes on. While `paused` (the answer is
    downstream of the provider: a stage or a slow caller has it) it never expires.
    """

    __slots__ = ("_handle", "_last", "_limit", "_loop", "_message", "_task", "expired", "paused")

    def __init__(self, limit: float, message: str) -> None:
        self._limit = limit
        self._message = message
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._last = self._loop.time()
        self._handle: asyncio.TimerHandle | None = self._loop.call_at(
            self._last + limit, self._check
        )
        self.expired = False
        self.paused = False

    def progress(self) -> None:
        self._last = self._loop.time()

    def follow(self) -> None:
        """The task waiting on the provider now is the one to cancel (a stage may read
        the first chunk in a helper task, and the rest in the turn's own)."""
        self._task = asyncio.current_task()

    def rearm(self, limit: float, message: str) -> None:
        """Switch to a new limit (first token -> idle), counted from now."""
        self._limit, self._message = limit, message
        self._last = self._loop.time()
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop.call_at(self._last + limit, self._check)

    def _check(self) -> None:
        if self.paused or self._task is None or self._task.done():
            # Nobody waits on the provider right now (a helper task that read the first
            # chunk has finished, the next reader has not followed yet): count from now.
            self._last = self._loop.time()
        due = self._last + self._limit
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        self._handle = None
        self.expired = True
        if self._task is not None:
            self._task.cancel()

    def caused_alone(self) -> bool:
        """For a CancelledError being handled: whether only this watchdog asked for it.

        If so, the cancellation is withdrawn (`uncancel`) and `timeout_error()` says what
        happened; if the caller left as well, the CancelledError must go on.
        """
        if self.expired and self._task is not None:
            self.expired = False
            return self._task.uncancel() == 0
        return False

    def timeout_error(self) -> UpstreamTimeout:
        return UpstreamTimeout(self._message)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
