"""What several llmgate processes must agree on, behind one seam each:

    limits    admission: streams in flight and requests per minute per key (LimitState)
    health    each provider's circuit and 429 cool-down (HealthBoard)
    channels  barge-in by turn_id (BargeIn)

Without `[state] redis_url` every one is this process's own, as it always was. With it,
`llmgate.state.redis` shares them through Redis, and serves from this process's own state
at once whenever Redis is down or slow (fail open), sharing again when it is back.
Chosen here, in one place; its lifetime is the app's (`state_ctx`, a cleanup context).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from llmgate.bargein import BargeIn, Channels
from llmgate.config import Config
from llmgate.server.limits import LimitState, LocalLimits

if TYPE_CHECKING:
    from llmgate.upstream.targets import Health


class HealthBoard(Protocol):
    """Where provider health is told to and heard from other processes."""

    def watch(self, health: Health) -> None:
        """`health` (a provider's, in the newest config) hears what others learn."""

    def failed(self, provider: str, status: int, retry_after_s: float | None) -> None: ...

    def succeeded(self, provider: str) -> None: ...

    def abandoned(self, provider: str) -> None:
        """A probe this process claimed ended with no verdict."""

    async def claim_probe(self, provider: str, for_s: float) -> bool:
        """A half-open circuit's one probe, across every process: True if this one may."""


class LocalBoard:
    """One process: nothing to tell, every probe its own."""

    def watch(self, health: Health) -> None:
        pass

    def failed(self, provider: str, status: int, retry_after_s: float | None) -> None:
        pass

    def succeeded(self, provider: str) -> None:
        pass

    def abandoned(self, provider: str) -> None:
        pass

    async def claim_probe(self, provider: str, for_s: float) -> bool:
        return True


class State:
    """This process's view of the shared state (or its own, without Redis)."""

    def __init__(self, limits: LimitState, channels: BargeIn, board: HealthBoard) -> None:
        self.limits = limits
        self.channels = channels
        self.board = board

    @property
    def shared(self) -> bool | None:
        """True: shared through Redis; False: Redis is down, this process's own for now;
        None: not configured."""
        return None

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def state_for(config: Config, global_max: int) -> State:
    """This process's own state, or, with `[state] redis_url`, Redis's."""
    settings = getattr(config, "state", None)
    if settings is not None and settings.redis_url:
        from llmgate.state.redis import RedisState  # (redis: only when configured)

        return RedisState(settings, global_max)
    return State(LocalLimits(global_max), Channels(), LocalBoard())


STATE = web.AppKey("state", State)


def state_ctx(app: web.Application) -> AsyncIterator[None]:
    """The state's connections and listeners live as long as the app."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        state = app[STATE]
        await state.start()
        try:
            yield
        finally:
            await state.aclose()

    return ctx(app)
