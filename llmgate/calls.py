"""An account per call: what one Agora channel's turns came to, written up when it ends.

Operators pay for a call, not a request. While a channel has turns, llmgate keeps its
account (turns, superseded and failed turns, prompt / cached / completion tokens, tool
calls, seconds of speech, first-token p50 and worst); when it has had no turn for
`server.call_idle_s`, or at shutdown, one `call` log line sums it up (no text, no keys),
/metrics counts the call and its length, and the account is forgotten. An account is a
few numbers and at most FIRST_TOKENS first-token times; at most MAX_CALLS are kept (past
that, the longest idle is written up early).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from llmgate.agora import channel_key
from llmgate.turn import CLIENT_CLOSED, Turn, cached_tokens

log = logging.getLogger("llmgate.call")

FIRST_TOKENS = 64  # a call's first-token times kept for its p50 (the worst is kept apart)
MAX_CALLS = 100_000


class Account:
    __slots__ = (
        "cached_tokens", "channel", "completion_tokens", "failed", "first", "first_tokens",
        "key", "last", "prompt_tokens", "speech_s", "superseded", "tool_calls", "turns",
        "worst_first_token",
    )

    def __init__(self, key: str | None, channel: str, now: float) -> None:
        self.key = key
        self.channel = channel
        self.first = self.last = now
        self.turns = self.superseded = self.failed = self.tool_calls = 0
        self.prompt_tokens = self.cached_tokens = self.completion_tokens = 0
        self.speech_s = 0.0
        self.first_tokens: list[float] = []
        self.worst_first_token: float | None = None

    def add(self, turn: Turn, now: float) -> None:
        self.last = now
        self.turns += 1
        if turn.superseded:
            self.superseded += 1
        elif turn.status >= 400 and turn.status != CLIENT_CLOSED:
            self.failed += 1
        usage = turn.usage or {}
        for field in ("prompt_tokens", "completion_tokens"):
            value = usage.get(field)
            if type(value) is int:
                setattr(self, field, getattr(self, field) + value)
        cached = cached_tokens(usage)
        if cached is not None:
            self.cached_tokens += cached
        notes = turn.notes
        if notes is not None:
            if notes.tools is not None:
                self.tool_calls += len(notes.tools.calls)
            if notes.audio is not None:
                self.speech_s += notes.audio.audio_s
        if turn.first_token is not None:
            ms = turn.first_token * 1000
            if len(self.first_tokens) < FIRST_TOKENS:
                self.first_tokens.append(ms)
            else:  # the call's latest turns stand for it
                self.first_tokens[self.turns % FIRST_TOKENS] = ms
            if self.worst_first_token is None or ms > self.worst_first_token:
                self.worst_first_token = ms

    def fields(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "key": self.key,
            "duration_s": round(self.last - self.first, 1),
            "turns": self.turns,
            "superseded": self.superseded,
            "failed": self.failed,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "tool_calls": self.tool_calls,
            "speech_s": round(self.speech_s, 1),
            "ttft_p50_ms": (
                round(statistics.median(self.first_tokens), 1) if self.first_tokens else None
            ),
            "ttft_worst_ms": (
                None if self.worst_first_token is None else round(self.worst_first_token, 1)
            ),
        }


class Calls:
    """The accounts of the calls in progress, oldest activity first."""

    def __init__(self, idle_s: float, metrics: bool = False, clock=time.monotonic) -> None:
        self.idle_s = idle_s
        self.metrics = metrics
        self._clock = clock
        self._live: OrderedDict[str, Account] = OrderedDict()
        self._peak = 0  # the most accounts held since the table was last made

    def __len__(self) -> int:
        return len(self._live)

    def add(self, turn: Turn) -> None:
        """A turn ended: its channel's account, if it has a channel, takes it in."""
        channel = channel_key(turn.metadata)
        if channel is None:
            return
        key = f"{turn.key}|{channel}"
        now = self._clock()
        account = self._live.get(key)
        if account is None:
            account = self._live[key] = Account(turn.key, channel, now)
            self._peak = max(self._peak, len(self._live))
            if len(self._live) > MAX_CALLS:
                self._end(next(iter(self._live)))
        else:
            self._live.move_to_end(key)
        account.add(turn, now)

    def sweep(self) -> None:
        """Write up every call idle for `idle_s`."""
        horizon = self._clock() - self.idle_s
        while self._live:
            key, account = next(iter(self._live.items()))
            if account.last > horizon:
                break
            self._end(key)
        if len(self._live) * 4 < self._peak:
            # a dict keeps its table at its largest: after a busy hour, a smaller one
            self._live = OrderedDict(self._live)
            self._peak = len(self._live)

    def end_all(self) -> None:
        while self._live:
            self._end(next(iter(self._live)))

    def _end(self, key: str) -> None:
        account = self._live.pop(key)
        fields = account.fields()
        log.info("call", extra={"turn": fields})
        if self.metrics:
            from llmgate.obs import metrics

            metrics.call_ended(account.last - account.first)


CALLS = web.AppKey("calls", Calls)


async def calls_ctx(app: web.Application) -> AsyncIterator[None]:
    """Idle calls written up as they go quiet; the rest at shutdown."""
    calls = app[CALLS]

    async def sweeping() -> None:
        while True:
            await asyncio.sleep(max(0.05, calls.idle_s / 4))
            calls.sweep()

    task = asyncio.get_running_loop().create_task(sweeping())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait({task})
        calls.end_all()
