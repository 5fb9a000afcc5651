"""The audio stage: the model's answer spoken sentence by sentence, in the stream, while it
is still being written.

    [[routes]] audio = "voice"   ->   [audio.voice] engine, voice, sample_rate, chunk_ms,
                                                    pace, lead_ms, max_words

A task reads the provider's stream and cuts its text into sentences; the turn's own task
speaks each one as it comes: first `choices[0].delta.audio = {id, transcript}`, then
frames of `{id, data}` (base64 PCM16 mono at `sample_rate`, exactly `chunk_ms` each, only
the answer's last one shorter), no faster than real time plus `lead_ms`. The text deltas
themselves are not sent on (the caller would speak them twice); roles, tool calls and the
finish chunk are. A barge-in cancels both tasks and kills the engine. A non-streamed
request gets the text answer as it is.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Protocol

from llmgate.config import AudioConfig
from llmgate.errors import ApiError
from llmgate.pipeline import OPENED, Ask, Call, Opened, Piece, end_task
from llmgate.protocol import generic_decoder
from llmgate.tts.espeak import EngineError
from llmgate.tts.pcm import Framer, Resampler, frame_size
from llmgate.tts.sentences import SentenceSplitter


class Engine(Protocol):
    name: str

    def synthesize(self, text: str) -> AsyncIterator[tuple[int, bytes]]: ...


_END = object()


class AudioStage:
    name = "audio"

    def __init__(self, config: AudioConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine

    def wrap(self, inner: Call) -> Call:
        async def call(ask: Ask) -> AsyncIterator[Piece | Opened]:
            if not ask.stream:
                async with aclosing(inner(ask)) as items:
                    async for item in items:
                        yield item
                return
            queue: asyncio.Queue[Any] = asyncio.Queue()
            reader = asyncio.ensure_future(self._read(inner, ask, queue))
            speech = _Speech(self.config, ask)
            try:
                while (item := await queue.get()) is not _END:
                    if isinstance(item, str):
                        async for frame in self._speak(item, speech):
                            yield frame
                    elif isinstance(item, Piece) and item.finish_reason:
                        last = speech.last_frame()
                        if last is not None:
                            yield last
                        yield item
                    elif isinstance(item, Piece | Opened):
                        yield item
                    else:
                        raise item  # the reader's failure: an error frame, like any other
            finally:
                await end_task(reader)
                ask.turn.note("audio", **speech.fields(self.engine.name))

        return call

    async def _read(self, inner: Call, ask: Ask, queue: asyncio.Queue[Any]) -> None:
        """The provider's stream into the queue: sentences as they complete, other pieces
        as they are, an exception if it fails, then _END."""
        splitter = SentenceSplitter(self.config.max_words)
        try:
            async with aclosing(inner(ask)) as items:
                async for item in items:
                    if item is OPENED or not isinstance(item, Piece):
                        queue.put_nowait(item)
                        continue
                    text, rest = _without_text(item)
                    for sentence in splitter.feed(text) if text else ():
                        queue.put_nowait(sentence)
                    if item.finish_reason:
                        for sentence in splitter.flush():
                            queue.put_nowait(sentence)
                    if rest is not None:
                        queue.put_nowait(rest)
            for sentence in splitter.flush():  # a stream cut short: the writer fails it
                queue.put_nowait(sentence)
        except Exception as exc:
            queue.put_nowait(exc)
        queue.put_nowait(_END)

    async def _speak(self, sentence: str, speech: _Speech) -> AsyncIterator[Piece]:
        yield speech.chunk({"transcript": sentence})
        resampler: Resampler | None = None
        try:
            async with aclosing(self.engine.synthesize(sentence)) as pieces:
                async for rate, pcm in pieces:
                    if resampler is None:
                        resampler = Resampler(rate, self.config.sample_rate)
                    for frame in speech.framer.push(resampler.push(pcm)):
                        await speech.pace(len(frame))
                        yield speech.audio(frame)
        except EngineError as exc:
            raise ApiError(503, f"speech engine '{self.engine.name}' failed: {exc}") from None
        if resampler is not None:
            for frame in speech.framer.push(resampler.push(b"", last=True)):
                await speech.pace(len(frame))
                yield speech.audio(frame)


class _Speech:
    """One answer's audio: its id, its frames, its pace, what the log line says of it."""

    def __init__(self, config: AudioConfig, ask: Ask) -> None:
        self.ask = ask
        self.id = "audio_" + ask.turn.id.removeprefix("req_")
        self.framer = Framer(frame_size(config.sample_rate, config.chunk_ms))
        self.bytes_per_s = config.sample_rate * 2
        self.lead_s = config.lead_ms / 1000
        self.pacing = config.pace
        self.started: float | None = None  # when the first frame went out
        self.sent = 0  # bytes of audio sent
        self.first_audio_ms: float | None = None
        self.created = int(time.time())

    def chunk(self, audio: dict[str, Any]) -> Piece:
        return Piece.of(
            {
                "id": "chatcmpl-" + self.ask.turn.id.removeprefix("req_"),
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.ask.body.get("model") or "",
                "choices": [
                    {
                        "index": 0,
                        "delta": {"audio": {"id": self.id, **audio}},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
        )

    def audio(self, frame: bytes) -> Piece:
        return self.chunk({"data": base64.b64encode(frame).decode()})

    def last_frame(self) -> Piece | None:
        rest = self.framer.flush()
        return self.audio(rest) if rest else None

    async def pace(self, size: int) -> None:
        """No faster than real time, `lead_ms` ahead of it."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.started is None:
            self.started = now
            self.first_audio_ms = round((time.perf_counter() - self.ask.turn.started) * 1000, 2)
        if self.pacing:
            due = self.started + self.sent / self.bytes_per_s - self.lead_s
            if due > now:
                await asyncio.sleep(due - now)
        self.sent += size

    def fields(self, engine: str) -> dict[str, Any]:
        return {
            "engine": engine,
            "first_audio_ms": self.first_audio_ms,
            "audio_s": round(self.sent / self.bytes_per_s, 3),
        }


def _without_text(piece: Piece) -> tuple[str, Piece | None]:
    """A piece's text, and what of it still goes on: itself if it has no text, the piece
    without its text if it has more (a role, tool calls, a finish), else nothing."""
    texts = [
        c.delta.content
        for c in piece.view.choices
        if c.delta is not None and isinstance(c.delta.content, str) and c.delta.content
    ]
    if not texts:
        return "", piece
    chunk = generic_decoder.decode(piece.data)
    keep = bool(chunk.get("usage"))
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        delta.pop("content", None)
        keep = keep or bool(delta) or bool(choice.get("finish_reason"))
    return "".join(texts), Piece.of(chunk) if keep else None
