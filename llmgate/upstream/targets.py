"""Where a turn may go, and how each place has been doing.

    Target    one provider and the model it is asked for there
    Plan      what a request's `model` named: its targets in order (an alias has several)
    Health    one provider's circuit breaker and 429 cool-down, shared by every plan using it
    Attempts  one turn's tries at its plan: their order, their outcomes, the error when all
              failed, and the turn's log fields

A failure counts against a provider only when it is the provider's (an UpstreamError whose
`fallback` is set): a caller hanging up, or a 400 for the caller's own mistake, does not.
"""

from __future__ import annotations

import email.utils
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from msgspec import UNSET

from llmgate.config import BreakerConfig
from llmgate.errors import ApiError, UpstreamError, logged_error
from llmgate.obs import metrics
from llmgate.turn import AttemptNote

if TYPE_CHECKING:
    from llmgate.state import HealthBoard
    from llmgate.turn import Turn
    from llmgate.upstream.provider import Provider

log = logging.getLogger("llmgate.upstream")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
_MESSAGE_CHARS = 300  # of each attempt's failure, in the message of a turn whose all failed
MAX_RETRY_AFTER_S = 600.0  # the longest a Retry-After may cool a provider down


class Health:
    """A provider's circuit: `failures` failures within `window_s` open it for
    `cooldown_s`; then one request at a time probes it (half-open) until one succeeds.
    A 429 with Retry-After cools the provider down for that long, circuit aside.

    Every failure and every close is also told to `board`, and what other processes
    learned arrives through `remote` (llmgate.state): with Redis, a circuit one process
    opens is open on every one, and a half-open circuit's probe is one across them all."""

    __slots__ = (
        "_clock", "_config", "_failures", "_opened_at", "_probe_started", "board",
        "cooling_until", "last_failure", "name", "probing", "state",
    )

    def __init__(
        self, name: str, config: BreakerConfig, board: HealthBoard | None = None,
        clock=time.monotonic,
    ) -> None:
        self.name = name
        self._config = config
        self.board = board
        self._clock = clock
        if board is not None:
            board.watch(self)
        self._failures: deque[float] = deque()
        self._opened_at = 0.0
        self.state = CLOSED
        self.probing = False  # half-open: a probe is in flight
        self._probe_started = 0.0
        self.cooling_until = 0.0
        self.last_failure = float("-inf")

    @property
    def breaker(self) -> BreakerConfig:
        return self._config

    def usable(self) -> bool:
        now = self._clock()
        if now < self.cooling_until:
            return False
        if self.state == OPEN and now - self._opened_at >= self._config.cooldown_s:
            self._set(HALF_OPEN)
        if self.state == OPEN:
            return False
        if self.probing and now - self._probe_started > self._config.cooldown_s:
            self.probing = False  # a probe that never came back (a bug's, not the caller's)
        return not (self.state == HALF_OPEN and self.probing)

    async def begin(self) -> bool:
        """An attempt starts on this provider: in half-open, it is the probe, if no other
        process has one in flight (False: this one may not probe)."""
        if self.state == HALF_OPEN:
            if self.board is not None and not await self.board.claim_probe(
                self.name, self._config.cooldown_s
            ):
                return False
            self.probing = True
            self._probe_started = self._clock()
        return True

    def succeeded(self) -> None:
        self.probing = False
        self._failures.clear()
        if self.state != CLOSED:
            self._set(CLOSED)
            if self.board is not None:
                self.board.succeeded(self.name)

    def remote(self, state: str, for_s: float = 0.0) -> None:
        """What another process learned: the circuit `open` (for `for_s` more), `closed`,
        or the provider cooling down (`cooling`) for `for_s`."""
        now = self._clock()
        if state == "cooling":
            self.cooling_until = max(self.cooling_until, now + for_s)
        elif state == OPEN and self.state != OPEN:
            self._opened_at = now - max(0.0, self._config.cooldown_s - for_s)
            self._failures.clear()
            self._set(OPEN)
        elif state == CLOSED and self.state != CLOSED:
            self._failures.clear()
            self.probing = False
            self._set(CLOSED)

    def abandoned(self) -> None:
        """The attempt ended with no verdict (the caller left, another target won)."""
        if self.probing and self.board is not None:
            self.board.abandoned(self.name)  # another process may probe at once
        self.probing = False

    def failed(self, exc: ApiError) -> None:
        now = self._clock()
        self.probing = False
        self.last_failure = now
        wait = retry_after_s(exc, 1.0) if exc.status == 429 else None
        if self.board is not None:
            self.board.failed(self.name, exc.status, wait)
        if wait is not None:
            self.cooling_until = max(self.cooling_until, now + wait)
            return  # a rate limit is not a breakdown: it cools, the circuit stays as it is
        if self.state == HALF_OPEN:
            self._open(now)
            return
        window = self._failures
        window.append(now)
        while window and now - window[0] > self._config.window_s:
            window.popleft()
        if self.state == CLOSED and len(window) >= self._config.failures:
            self._open(now)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._failures.clear()
        self._set(OPEN)

    def _set(self, state: str) -> None:
        log.warning("provider '%s': circuit %s -> %s", self.name, self.state, state)
        self.state = state
        metrics.circuit(self.name, state)


@dataclass(frozen=True, slots=True)
class Target:
    provider: Provider
    model: str
    health: Health

    @property
    def name(self) -> str:
        return f"{self.provider.name}/{self.model}"


@dataclass(frozen=True, slots=True)
class Plan:
    name: str  # what the request's `model` said (an alias's name, or the model)
    targets: tuple[Target, ...]
    hedge_after_s: float | None = None
    alias: bool = False

    @property
    def first(self) -> Target:
        return self.targets[0]

    @property
    def cache_by_channel(self) -> bool:
        """Every target's provider asks for a prompt_cache_key by channel."""
        return all(t.provider.config.prompt_cache_key == "channel" for t in self.targets)

    @property
    def forward(self) -> frozenset[str]:
        """The top-level fields any target forwards (each target drops the rest)."""
        out = self.targets[0].provider.forward
        for target in self.targets[1:]:
            out = out | target.provider.forward
        return out

    def body(self, body: dict[str, Any], target: Target) -> dict[str, Any]:
        """The upstream body for `target`: its model, and only the fields it forwards."""
        out = {**body, "model": target.model}
        if len(self.targets) > 1:
            for key in [k for k in out if k not in target.provider.forward]:
                del out[key]
        return out


class Attempts:
    """One turn's tries at its plan's targets, in the order their health allows."""

    __slots__ = (
        "_begun", "_records", "_started", "_watch", "failures", "hedges", "plan", "queue",
        "turn",
    )

    def __init__(self, plan: Plan, turn: Turn) -> None:
        self.plan = plan
        self.turn = turn
        self.queue = deque(_order(plan.targets) if len(plan.targets) > 1 else plan.targets)
        # (target, status, message, Retry-After in s or None, (type, code)): no exception
        # is kept, as one held here would hold, through its traceback, the frames that
        # hold this.
        self.failures: list[tuple[Target, int, str, float | None, tuple[str, str | None]]] = []
        self.hedges = 0
        self._records: list[AttemptNote] = []
        self._started: dict[int, float] = {}
        self._begun: list[Target] = []  # begun, no verdict yet
        # Health matters where there is a choice: a one-target turn neither reads nor
        # writes it (the plain relay of one target never looks, so neither does the rest).
        self._watch = len(plan.targets) > 1

    async def next(self) -> Target | None:
        """The next target to try, marked begun; None when none is left. A half-open
        provider whose probe another process holds is passed over, unless it is the last."""
        if not self.queue:
            return None
        target = self.queue.popleft()
        if self._watch:
            while not await target.health.begin() and self.queue:
                target = self.queue.popleft()
        self._started[id(target)] = time.perf_counter()
        self._begun.append(target)
        return target

    def failed(self, target: Target, exc: ApiError) -> None:
        self._ended(target)
        if self._watch:
            # A passthrough provider's 429 is the caller's own key over its quota: the
            # turn moves on, the provider stays open to every other caller.
            mine = exc.status == 429 and target.provider.passthrough
            if exc.fallback and not mine:
                target.health.failed(exc)
            else:
                target.health.abandoned()
        wait = retry_after_s(exc, 1.0) if exc.status == 429 else None
        self.failures.append((target, exc.status, exc.message, wait, (exc.type, exc.code)))
        self._record(target, error=logged_error(exc.code or exc.type))
        self.note()

    def won(self, target: Target) -> None:
        """`target`'s first token came: the turn is its."""
        self._ended(target)
        if self._watch:
            target.health.succeeded()
        self.turn.provider, self.turn.model = target.provider.name, target.model
        self._record(target)
        self.note()

    def close(self) -> None:
        """Every target begun and given no verdict stopped with none: another target won,
        or the turn ended (a half-open circuit's probe is free again)."""
        for target in self._begun:
            if self._watch:
                target.health.abandoned()
            self._record(target, error="cancelled")
        self._begun.clear()
        self.note()

    def _ended(self, target: Target) -> None:
        if target in self._begun:
            self._begun.remove(target)

    def died(self, target: Target, exc: ApiError) -> None:
        """The winner failed after its first token: its provider's failure all the same."""
        if self._watch and exc.fallback:
            target.health.failed(exc)

    def error(self) -> ApiError:
        """Every target failed: the most telling failure (a 429, with the earliest
        Retry-After, over a 504, over anything else as a 502), naming every attempt."""
        self.note()
        statuses = {status for _, status, _, _, _ in self.failures}
        status = 429 if 429 in statuses else 504 if 504 in statuses else 502
        tried = "; ".join(f"{t.name}: {_clip(m)}" for t, _, m, _, _ in self.failures)
        failed = {t for t, _, _, _, _ in self.failures}
        skipped = [t.name for t in self.plan.targets if t not in failed]
        message = f"model '{self.plan.name}': every target failed ({tried})"
        if skipped:
            message += f"; not tried (circuit open or cooling down): {', '.join(skipped)}"
        waits = [w for _, s, _, w, _ in self.failures if s == 429 and w is not None]
        headers = {"Retry-After": str(max(1, math.ceil(min(waits))))} if waits else {}
        # the type and code a failure of that status carried (a provider's own, say), as
        # the caller of a one-target plan would have had them
        same = [k for _, s, _, _, k in self.failures if s == status]
        kind, code = same[0] if same else (None, None)
        return UpstreamError(status, message, headers=headers, type=kind, code=code)

    def note(self) -> None:
        if self.plan.alias or len(self._records) > 1:
            note = self.turn.noted().upstream
            note.alias, note.attempts = self.plan.name, self._records
            if self.hedges:
                note.hedges = self.hedges

    def _record(self, target: Target, error: str | None = None) -> None:
        started = self._started.get(id(target), time.perf_counter())
        ms = round((time.perf_counter() - started) * 1000, 1)
        start_ms = round((started - self.turn.started) * 1000, 1)
        self._records.append(
            AttemptNote(target=target.name, ms=ms, start_ms=start_ms, error=error or UNSET)
        )


def _order(targets: tuple[Target, ...]) -> list[Target]:
    """The usable targets in order; if none is, the one whose provider failed longest ago
    (a turn is never refused for a circuit alone)."""
    usable = [t for t in targets if t.health.usable()]
    if usable:
        return usable
    return [min(targets, key=lambda t: t.health.last_failure)]


def retry_after_s(exc: ApiError, default: float) -> float:
    """Seconds from an error's Retry-After-Ms or Retry-After (seconds or an HTTP date),
    at most MAX_RETRY_AFTER_S: a provider's 400-digit wait must not cool it forever."""
    return min(_retry_after_s(exc.headers, default), MAX_RETRY_AFTER_S)


def _retry_after_s(headers: dict[str, str], default: float) -> float:
    try:
        if "Retry-After-Ms" in headers:
            return max(0.0, float(headers["Retry-After-Ms"]) / 1000)
        value = headers.get("Retry-After")
        if value is None:
            return default
        if value.strip().replace(".", "", 1).isdigit():
            return float(value)
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (ValueError, TypeError, OverflowError):
        return default


def _clip(text: str) -> str:
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS] + "..."
