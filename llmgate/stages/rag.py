"""The RAG stage: retrieve from a knowledge base, put the passages in the conversation, and
say "one moment" while the caller would otherwise hear nothing.

    [[routes]] rag = "docs"   ->   [rag.docs] kb, top_k, min_score, query_turns, template,
                                              max_context_tokens
                                   [rag.docs.waiting] phrases, after_ms

The query is the last `query_turns` user messages (so "and on weekends?" still finds the
opening hours). Where the passages go is `placement`: by default a system message just
before the newest user message(s), so that everything before it is byte for byte what the
previous turn sent and the provider's prompt cache keeps it warm; `in_question` puts them
in the newest user message's text (a provider that merges every system message into one
would move them to the top); `system` after the caller's own system messages. The
passages of earlier turns are never carried forward (the engine's history holds none).
With `after_ms = 0` a waiting phrase goes out at once, before retrieval; with N > 0 only
if no answer token has come N ms after the request, and never when the answer is
quicker. Non-streamed requests get no waiting phrase.

The passages are held to `max_context_tokens`, estimated as characters / 4 (English text
runs about 4 characters a token; no tokenizer on the voice path): the passages that fit go
in whole, the first that does not is cut at a word, the rest are left out.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from llmgate.config import RagConfig
from llmgate.kb.base import Hit, KbError, Reader
from llmgate.obs import tracing
from llmgate.pipeline import Ask, Call, Opened, Piece, end_task, own_head

log = logging.getLogger("llmgate.rag")

TEMPLATE = (
    "Passages from the knowledge base that may answer the user's last question. Answer from "
    "them when they are relevant, in plain spoken sentences; if they do not hold the answer, "
    "say you do not know rather than guess.\n\n{passages}"
)
CHARS_PER_TOKEN = 4  # the estimate max_context_tokens is held to
LABEL_CHARS = 120  # at most this much of a passage's source, and of its heading
NOTHING_FOUND = (
    "The knowledge base has nothing on the user's last question. Say you do not know rather "
    "than guess, and offer what you can help with."
)


class RagStage:
    name = "rag"

    def __init__(self, config: RagConfig, retriever: Reader) -> None:
        self.config = config
        self.retriever = retriever
        # say the next one next time: a caller hears no litany
        self._phrases = itertools.cycle(config.waiting.phrases)

    def wrap(self, inner: Call) -> Call:
        async def call(ask: Ask) -> AsyncIterator[Piece | Opened]:
            started = time.monotonic()
            ask.turn.noted().rag.start_ms = round(ask.turn.elapsed() * 1000, 2)
            waiting = self.config.waiting
            filler = ask.stream and bool(waiting.phrases)
            if filler and waiting.after_ms == 0:
                yield self._waiting(ask)
                filler = False
            deadline = started + waiting.after_ms / 1000
            if not filler:
                hits = await self._retrieve(ask)
            else:  # retrieval in a task of its own, so that the phrase can go out meanwhile
                search = asyncio.ensure_future(self._retrieve(ask))
                try:
                    if not await _done_by(search, deadline):
                        yield self._waiting(ask)
                        filler = False
                    hits = await search
                finally:
                    await end_task(search)
            top = round(hits[0].score, 3) if hits else None
            elapsed = round((time.monotonic() - started) * 1000, 2)
            note = ask.turn.noted().rag
            note.retrieval_ms, note.hits, note.top_score = elapsed, len(hits), top
            if ask.turn.detail is not None:  # the playground shows what was found
                ask.turn.detail["sources"] = [
                    {"source": h.source, "heading": h.heading, "score": round(h.score, 4)}
                    for h in hits
                ]
            _place(ask.body["messages"], self._system_message(hits), self.config.placement)
            async with aclosing(inner(ask)) as items:
                while filler:  # no answer yet: the phrase goes out if none comes in time
                    step = asyncio.ensure_future(anext(items))
                    try:
                        if not await _done_by(step, deadline):
                            yield self._waiting(ask)
                            filler = False
                        item = await step
                    except StopAsyncIteration:
                        return
                    finally:
                        await end_task(step)
                    if isinstance(item, Piece) and _has_answer(item):
                        filler = False
                    yield item
                async for item in items:
                    yield item

        return call

    async def _retrieve(self, ask: Ask) -> list[Hit]:
        question = query_text(ask.body.get("messages") or [], self.config.query_turns)
        if not question:
            return []
        try:
            with tracing.span("rag.retrieve", kb=self.retriever.name, top_k=self.config.top_k):
                return await self.retriever.search(
                    question, self.config.top_k, self.config.min_score
                )
        except Exception as exc:
            # The caller still gets an answer (one that says it does not know): a base
            # that cannot be read must not silence the agent. The log says why (each
            # backend says it as a KbError; anything else is its bug).
            if isinstance(exc, KbError):
                log.error("rag: kb '%s' cannot be searched: %s", self.retriever.name, exc)
            else:
                log.error("rag: kb '%s' search failed", self.retriever.name, exc_info=True)
            ask.turn.noted().rag.error = type(exc).__name__
            return []

    def _system_message(self, hits: list[Hit]) -> dict[str, Any]:
        if not hits:
            return {"role": "system", "content": NOTHING_FOUND}
        room = self.config.max_context_tokens * CHARS_PER_TOKEN
        parts: list[str] = []
        for i, hit in enumerate(hits, 1):
            source = hit.source[:LABEL_CHARS]
            label = f"[{i}] ({source}{' - ' + hit.heading[:LABEL_CHARS] if hit.heading else ''})"
            room -= len(label) + 3  # and the newline after it, the blank line before
            if len(hit.text) <= room:
                parts.append(f"{label}\n{hit.text}")
                room -= len(hit.text)
                continue
            if room > 0:  # the first passage that does not fit is cut at a word
                cut = hit.text[:room].rpartition(" ")[0] or hit.text[:room]
                parts.append(f"{label}\n{cut} ...")
            break
        passages = "\n\n".join(parts)
        template = self.config.template or TEMPLATE
        return {"role": "system", "content": template.replace("{passages}", passages)}

    def _waiting(self, ask: Ask) -> Piece:
        """A whole chat.completion.chunk the openai SDKs parse, spoken like any answer."""
        phrase = next(self._phrases)
        note = ask.turn.noted().rag
        note.waiting, note.waiting_ms = True, round(ask.turn.elapsed() * 1000, 2)
        return Piece.of(  # whole: spoken at once, not held for the answer's next word
            {
                **own_head(ask),
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": phrase + " "},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            },
            whole=True,
        )


def query_text(messages: list[Any], turns: int) -> str:
    """The last `turns` user messages' text, oldest first."""
    texts: list[str] = []
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, list):
            parts = [p for p in content if isinstance(p, dict) and p.get("type") == "text"]
            content = " ".join(str(p.get("text", "")) for p in parts)
        if isinstance(content, str) and content.strip():
            texts.append(content.strip())
        if len(texts) == turns:
            break
    return "\n".join(reversed(texts))


def _place(messages: list[Any], system: dict[str, Any], placement: str) -> None:
    """The passages' system message where `placement` says (see the module's notes)."""
    question = _question(messages)
    if placement == "system" or question is None:
        at = 0  # after the caller's own leading system (or developer) messages
        while at < len(messages) and _role(messages[at]) in ("system", "developer"):
            at += 1
        messages.insert(at, system)
    elif placement == "before_question":
        messages.insert(question, system)
    else:  # in_question: the passages, then the newest question's own text
        newest = max(i for i in range(question, len(messages)) if _role(messages[i]) == "user")
        message = messages[newest]
        content = message.get("content")
        if isinstance(content, list):
            message["content"] = [{"type": "text", "text": system["content"]}, *content]
        else:
            message["content"] = f"{system['content']}\n\n{content or ''}"


def _question(messages: list[Any]) -> int | None:
    """Where the newest user message(s) begin: the last run of user messages (two or more
    in a row when the engine appended turns; the request may end with an assistant's)."""
    at = len(messages)
    while at > 0 and _role(messages[at - 1]) != "user":
        at -= 1
    if at == 0:
        return None
    while at > 0 and _role(messages[at - 1]) == "user":
        at -= 1
    return at


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def _has_answer(piece: Piece) -> bool:
    return any(
        c.delta is not None and (c.delta.content or c.delta.tool_calls or c.delta.audio)
        for c in piece.view.choices
    )


async def _done_by(task: asyncio.Future, deadline: float) -> bool:
    """Whether `task` finished before `deadline` (time.monotonic()); it goes on either way."""
    if task.done():
        return True
    done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
    return bool(done)
