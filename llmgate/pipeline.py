"""The seam between caller and provider: what a stage sees, and how stages compose.

    Ask     the upstream body as a dict (not yet encoded), the turn, and where it goes
    Piece   one upstream chunk: its frame as it came, its JSON, and a small decoded view
    OPENED  the provider said 200: the writer may send the caller its headers
    Call    Ask -> async iterator of OPENED and Pieces (the provider's, or a stage's)
    Stage   wrap(inner: Call) -> Call

A stage that changes a chunk replaces its Piece (`Piece.of`); one it leaves alone passes
the same object on, so its bytes reach the caller as the provider sent them. A stage
that yields a Piece before OPENED (a waiting message) gets the caller's headers sent then.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from llmgate.protocol import ChunkView, encoder, generic_decoder, view_decoder

if TYPE_CHECKING:
    import aiohttp

    from llmgate.errors import ApiError
    from llmgate.turn import Turn
    from llmgate.upstream.targets import Plan


@dataclass(slots=True)
class Ask:
    body: dict[str, Any]
    turn: Turn
    plan: Plan  # where it goes: one target, or an alias's in order
    session: aiohttp.ClientSession
    caller_key: str | None
    stream: bool = True  # the caller gets a stream (a stage may speak before the answer)
    apology: str | None = None  # said when the provider dies mid-answer (on_stream_error)


class Piece:
    """One chunk of the answer. A provider's is decoded once, into its small `view`; one a
    stage made keeps the dict it was made from, so the next stage that changes it does not
    decode what was just encoded (`decoded()`), and its view is decoded only if asked for."""

    __slots__ = ("_chunk", "_finish", "_view", "data", "more", "raw", "whole")

    def __init__(
        self,
        raw: bytes,
        data: bytes,
        view: ChunkView | None,
        whole: bool = False,
        chunk: dict[str, Any] | None = None,
    ) -> None:
        self.raw = raw  # the SSE frame, `data: ...\n\n`, as the caller will get it
        self.data = data  # its JSON payload
        self._view = view
        self._chunk = chunk
        self._finish: str | None = None
        # A phrase llmgate says itself (a waiting phrase, a filler, an apology): whole the
        # moment it is said, so a stage that cuts text into sentences speaks it at once.
        self.whole = whole
        # More of the provider's chunks came in the same read and follow at once: the
        # writer sends them together, one write for a read as on the plain route.
        self.more = False

    @classmethod
    def of(cls, chunk: dict[str, Any], whole: bool = False) -> Piece:
        """A piece for a chunk a stage made or changed."""
        data = encoder.encode(chunk)
        piece = cls(b"data: " + data + b"\n\n", data, None, whole, chunk)
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict) and choice.get("finish_reason"):
                piece._finish = choice["finish_reason"]
                break
        return piece

    @property
    def view(self) -> ChunkView:
        if self._view is None:
            # from the dict it was made from while this piece still holds it: no JSON parse
            chunk = self._chunk
            view = view_decoder.decode(self.data) if chunk is None else _as_view(chunk)
            self._view = view
        return self._view

    def decoded(self) -> dict[str, Any]:
        """The chunk as a dict the caller may change: the one a stage made it from (handed
        over once), else decoded from its bytes."""
        chunk, self._chunk = self._chunk, None
        return chunk if chunk is not None else generic_decoder.decode(self.data)

    @property
    def finish_reason(self) -> str | None:
        if self._view is None:
            return self._finish
        for choice in self._view.choices:
            if choice.finish_reason:
                return choice.finish_reason
        return None


def _as_view(chunk: dict[str, Any]) -> ChunkView:
    return msgspec.convert(chunk, ChunkView)


class Opened:
    __slots__ = ()

    def __repr__(self) -> str:
        return "OPENED"


OPENED = Opened()

Call = Callable[[Ask], AsyncIterator[Piece | Opened]]


class Stage(Protocol):
    def wrap(self, inner: Call) -> Call: ...


def own_head(ask: Ask) -> dict[str, Any]:
    """The head of a chunk llmgate writes itself before (or without) the provider's: a
    waiting phrase, a filler, an announcement."""
    return turn_head(ask.turn, ask.body.get("model") or "")


def turn_head(turn: Turn, model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-" + turn.id.removeprefix("req_"),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }


def chunk_head(ask: Ask, view: ChunkView) -> dict[str, Any]:
    """The head of a chunk llmgate adds to the provider's answer: the provider's own."""
    head = own_head(ask)
    if isinstance(view.id, str):
        head["id"] = view.id
    if type(view.created) is int:
        head["created"] = view.created
    if isinstance(view.model, str):
        head["model"] = view.model
    return head


def apologize(
    turn: Turn, exc: ApiError, text: str, finished: bool, head: dict[str, Any]
) -> list[dict[str, Any]]:
    """The one policy of `server.on_stream_error = "apology"`, for a failure after the
    answer began: the failure is the turn's all the same (its log line says so), and the
    caller hears `text` and a normal end instead of silence; or, when the answer had
    already finished (only its usage, say, was lost), the normal end alone."""
    turn.end(exc.status, exc.code or exc.type)
    turn.noted().upstream.apology = not finished
    return [] if finished else _apology_chunks(head, text)


def _apology_chunks(head: dict[str, Any], text: str) -> list[dict[str, Any]]:
    """A short spoken sentence and a normal end."""
    delta = {"content": " " + text}
    return [
        {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
        {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]


async def end_task(task: asyncio.Future) -> None:
    """A stage's helper task is never left running when its turn ends (a hang-up, say):
    cancelled if need be, and waited for, so the call it was reading can then be closed."""
    if not task.done():
        task.cancel()
    await asyncio.wait({task})


def compose(inner: Call, stages: Sequence[Stage]) -> Call:
    """The call a route makes: `stages` listed outermost first, around `inner`."""
    for stage in reversed(stages):
        inner = stage.wrap(inner)
    return inner
