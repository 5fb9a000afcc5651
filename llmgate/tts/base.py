"""What every speech engine is: text in, (sample rate, PCM16 mono) pieces out, as they come."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol


class EngineError(Exception):
    """A speech engine that cannot run or failed; the message says which and why."""


class Engine(Protocol):
    name: str
    # Words in an answer's first piece, for an engine whose first audio waits for a whole
    # piece (None: it streams, cut as any other sentence).
    first_words: int | None

    async def start(self) -> None:
        """Ready the engine (load a model, open a client) when the app starts."""

    async def aclose(self) -> None: ...

    def check(self) -> None:
        """EngineError if it cannot speak now (asked before the provider is)."""

    def synthesize(self, text: str) -> AsyncIterator[tuple[int, bytes]]:
        """`text` spoken. Closing the iterator early (a barge-in) stops the engine's work."""
        ...
