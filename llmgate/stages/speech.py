"""The speech stage: every content delta made speakable before the caller's TTS reads it.

Route option `speech = true` (markdown, emoji and URLs out), or a table
`speech = { markdown = true, emoji = true, urls = "drop" | "domain" | "keep" }`.
A chunk whose text changed is re-encoded from the provider's own JSON with only
`delta.content` replaced, so its id, created, model and every other field stay; a chunk
left as it was goes on as the same bytes. Roles, tool calls, finish_reason and usage pass.

A delta longer than `SLICE` characters (no model writes one; a broken or hostile provider
may send megabytes) is cleaned a slice at a time, the event loop free between slices, and
goes on as several chunks, one a slice: no other call waits on it, and no stage after this
one is handed more than a slice's text at once.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from llmgate.pipeline import Ask, Call, Opened, Piece
from llmgate.text.speakable import Speakable, SpeechOptions
from llmgate.turn import SpeechNote

SLICE = 8192  # characters cleaned in one go: about 10 ms of the event loop

class SpeechStage:
    name = "speech"

    def __init__(self, options: SpeechOptions) -> None:
        self.options = options

    def wrap(self, inner: Call) -> Call:
        options = self.options

        async def call(ask: Ask) -> AsyncIterator[Piece | Opened]:
            texts: dict[int, Speakable] = {}
            try:
                async with aclosing(inner(ask)) as items:
                    async for item in items:
                        if isinstance(item, Piece):
                            if not item.whole and _oversized(item):
                                head, leading, item = _cut_off(item)
                                async for part in _slices(head, leading, texts, options):
                                    yield part
                            if item.whole and texts:
                                # what the answer's text still holds goes before the phrase
                                # (an apology after a cut sentence: the sentence ends first)
                                held = _held(item, texts)
                                if held is not None:
                                    yield held
                            # A phrase of llmgate's own is made speakable on its own (the
                            # answer's text around it keeps its state) and stays whole.
                            spoken = _spoken(item, {} if item.whole else texts, options)
                            if spoken is None:
                                continue
                            item = spoken
                            if ask.turn.first_sentence is None and _ends_sentence(item):
                                ask.turn.mark_first_sentence()
                        yield item
            finally:
                dropped = sum(t.dropped for t in texts.values())
                if dropped:
                    ask.turn.noted().speech = SpeechNote(dropped_chars=dropped)

        return call


_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f](?:\s|$)")


def _ends_sentence(piece: Piece) -> bool:
    """Whether the piece ends a sentence (the turn's clock: its first sentence, whole)."""
    for choice in piece.view.choices:
        content = choice.delta.content if choice.delta is not None else None
        if isinstance(content, str) and _SENTENCE_END.search(content):
            return True
        if choice.finish_reason:
            return True
    return False


def _spoken(piece: Piece, texts: dict[int, Speakable], options: SpeechOptions) -> Piece | None:
    """The piece with its content made speakable: itself if nothing changed, None if
    nothing is left of it."""
    changed: dict[int, str] = {}
    for choice in piece.view.choices:
        delta = choice.delta
        content = delta.content if delta is not None else None
        if content is not None and not isinstance(content, str):
            continue  # content parts of a shape we do not know pass on as they are
        if not content and not choice.finish_reason:
            continue
        text = texts.get(choice.index)
        if text is None:
            if not content:
                continue
            text = texts[choice.index] = Speakable(options)
        spoken = text.feed(content) if content else ""
        if choice.finish_reason or piece.whole:
            spoken += text.finish()
        if piece.whole and content and spoken and not spoken[0].isspace():
            # a phrase on its own starts afresh, but the space that parts it from the
            # answer's words before it stays ("... opens" " Sorry, ...")
            spoken = content[: len(content) - len(content.lstrip())] + spoken
        if spoken != (content or ""):
            changed[choice.index] = spoken
    if not changed:
        return piece
    if _only_text(piece) and not any(changed.values()):
        return None  # a delta of nothing but markup: nothing to send
    chunk = piece.decoded()
    for choice in chunk.get("choices") or ():
        index = choice.get("index", 0)
        if index in changed:
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = choice["delta"] = {}
            delta["content"] = changed[index]
    return Piece.of(chunk, piece.whole)


def _oversized(piece: Piece) -> bool:
    return any(
        c.delta is not None and isinstance(c.delta.content, str) and len(c.delta.content) > SLICE
        for c in piece.view.choices
    )


_Leading = list[tuple[int, Any, str]]  # (choice index, its role or None, text)


def _cut_off(piece: Piece) -> tuple[dict[str, Any], _Leading, Piece]:
    """A delta too long to clean at once: its chunk's head, each long content but its last
    slice (with the role, which goes first), and the piece left with those last slices."""
    chunk = piece.decoded()
    head = {k: v for k, v in chunk.items() if k not in ("choices", "usage")}
    leading: _Leading = []
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(content, str) and len(content) > SLICE:
            last = len(content) - (len(content) - 1) % SLICE - 1  # where the last slice starts
            leading.append((choice.get("index", 0), delta.pop("role", None), content[:last]))
            delta["content"] = content[last:]
    return head, leading, Piece.of(chunk)


async def _slices(
    head: dict[str, Any], leading: _Leading, texts: dict[int, Speakable], options: SpeechOptions
) -> AsyncIterator[Piece]:
    """The leading slices cleaned, one chunk each (none for one left with nothing to say),
    the loop let go between them."""
    for index, role, content in leading:
        text = texts.setdefault(index, Speakable(options))
        for at in range(0, len(content), SLICE):
            delta: dict[str, Any] = {} if role is None or at else {"role": role}
            spoken = text.feed(content[at : at + SLICE])
            if spoken:
                delta["content"] = spoken
            if delta:
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
                yield Piece.of({**head, "choices": [choice]})
            await asyncio.sleep(0)  # the other calls' turn


def _held(piece: Piece, texts: dict[int, Speakable]) -> Piece | None:
    """A chunk of what the answer's text still holds back, with `piece`'s head; None when
    it holds nothing."""
    held = {index: text.finish() for index, text in texts.items()}
    choices = [
        {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
        for index, text in held.items()
        if text
    ]
    if not choices:
        return None
    chunk = piece.decoded()
    head = {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}
    return Piece.of({**head, "choices": choices})


def _only_text(piece: Piece) -> bool:
    """A chunk that carries content and nothing else worth sending on its own."""
    view = piece.view
    if view.usage or len(view.choices) != 1:
        return False
    choice = view.choices[0]
    delta = choice.delta
    return (
        choice.finish_reason is None
        and delta is not None
        and delta.role is None
        and not delta.tool_calls
        and delta.audio is None
        and delta.refusal is None
    )


def options_from(value: Any) -> SpeechOptions | None:
    """A route's `speech` value as options; None when the stage is off."""
    if value is False:
        return None
    if value is True:
        return SpeechOptions()
    return SpeechOptions(markdown=value.markdown, emoji=value.emoji, urls=value.urls)
