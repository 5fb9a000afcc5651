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
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from llmgate.config import AudioConfig
from llmgate.errors import ApiError
from llmgate.obs import tracing
from llmgate.pipeline import OPENED, Ask, Call, Opened, Piece, end_task, own_head
from llmgate.tts.base import Engine, EngineError
from llmgate.tts.file import FileEngine
from llmgate.tts.pcm import Framer, Resampler, frame_size
from llmgate.tts.sentences import SentenceSplitter
from llmgate.turn import AudioNote
from llmgate.upstream.call import model_audio

_END = object()
AHEAD = 16  # items (sentences, pieces) read ahead of what the caller has been sent
MAX_SENTENCE_S = 120.0  # of one sentence's audio (a hostile speech endpoint's is cut here)


class AudioStage:
    name = "audio"

    def __init__(self, config: AudioConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine

    def wrap(self, inner: Call) -> Call:
        if isinstance(self.engine, FileEngine):
            return self._announce

        async def call(ask: Ask) -> AsyncIterator[Piece | Opened]:
            if not ask.stream:
                async with aclosing(inner(ask)) as items:
                    async for item in items:
                        yield item
                return
            try:
                self.engine.check()
            except EngineError as exc:  # before the provider is asked: a plain 503
                raise unspoken(self.engine.name, exc) from None
            # Bounded: the reader waits while the caller hears what is queued (the
            # provider's watchdog is paused meanwhile), so a fast or hostile provider is
            # held back instead of every sentence it sends being queued and synthesised.
            queue: asyncio.Queue[Any] = asyncio.Queue(AHEAD)
            syntheses: list[_Synthesis] = []
            reader = asyncio.ensure_future(self._read(inner, ask, queue, syntheses))
            speech = _Speech(self.config, ask)
            try:
                while (item := await queue.get()) is not _END:
                    if isinstance(item, _Synthesis):
                        async for piece in self._speak(item, speech):
                            yield piece
                    elif isinstance(item, _Upstream):
                        if item.transcript:
                            yield speech.chunk({"transcript": item.transcript})
                        for frame in speech.frames(speech.upstream(item.pcm)):
                            yield await speech.audio(frame)
                    elif isinstance(item, Piece) and item.finish_reason:
                        for frame in speech.rest():
                            yield await speech.audio(frame)
                        yield item
                    elif isinstance(item, Piece):
                        speech.follow(item)
                        yield item
                    elif isinstance(item, Opened):
                        yield item
                    else:
                        raise item  # the reader's failure: an error frame, like any other
            finally:
                await end_task(reader)
                for synthesis in syntheses:  # a barge-in: no engine keeps working
                    await end_task(synthesis.task)
                ask.turn.noted().audio = speech.note(self.engine.name)

        return call

    async def _read(
        self, inner: Call, ask: Ask, queue: asyncio.Queue[Any], syntheses: list[_Synthesis]
    ) -> None:
        """The provider's stream into the queue: a synthesis for each sentence as it
        completes (started at once, so it runs while the one before it is spoken), the
        model's own audio, other pieces as they are, an exception if it fails, then _END."""
        first = self.config.first_words or self.engine.first_words
        splitter = SentenceSplitter(self.config.max_words, first_words=first)

        async def said(sentences: list[str]) -> None:
            if sentences:
                ask.turn.mark_first_sentence()
            for sentence in sentences:
                after = syntheses[-1] if syntheses else None
                syntheses.append(_Synthesis(sentence, self.engine, after))
                await queue.put(syntheses[-1])

        try:
            async with aclosing(inner(ask)) as items:
                async for item in items:
                    if item is OPENED or not isinstance(item, Piece):
                        await queue.put(item)
                        continue
                    text, audio, rest = _split(item)
                    if rest is not None and not item.finish_reason:
                        await queue.put(rest)  # a role before the audio it begins
                    if text and item.whole:
                        # llmgate's own phrase is a sentence the moment it is said: what
                        # the answer left unfinished ends first (a cut sentence before an
                        # apology), then the phrase is spoken, without waiting for a next word
                        await said(
                            [*splitter.flush(), *([text.strip()] if text.strip() else [])]
                        )
                    elif text:
                        await said(splitter.feed(text))
                    if audio is not None:
                        await queue.put(audio)
                    if item.finish_reason:
                        await said(splitter.flush())
                        if rest is not None:
                            await queue.put(rest)
            await said(splitter.flush())  # a stream cut short: the writer fails it
        except Exception as exc:
            await queue.put(exc)
        await queue.put(_END)

    async def _speak(self, synthesis: _Synthesis, speech: _Speech) -> AsyncIterator[Piece]:
        yield speech.chunk({"transcript": synthesis.sentence})
        synthesis.playing.set()  # the next sentence may be synthesised now
        resampler: Resampler | None = None
        async for rate, pcm in synthesis.pcm(self.engine.name):
            if resampler is None:
                resampler = Resampler(rate, self.config.sample_rate)
            for frame in speech.frames(resampler.push(pcm)):
                yield await speech.audio(frame)
        if resampler is not None:
            for frame in speech.frames(resampler.push(b"", last=True)):
                yield await speech.audio(frame)

    async def _announce(self, ask: Ask) -> AsyncIterator[Piece | Opened]:
        """The file engine: a fixed announcement, the provider never asked."""
        assert isinstance(self.engine, FileEngine)
        speech = _Speech(self.config, ask)
        synthesis: _Synthesis | None = None
        try:
            try:
                text = await self.engine.transcript()
            except EngineError as exc:
                raise unspoken(self.engine.name, exc) from None
            if not ask.stream:
                yield speech.chunk({"role": "assistant", "content": text}, audio=False)
            else:
                yield speech.chunk({"role": "assistant"}, audio=False)
                synthesis = _Synthesis(text, self.engine, None)
                async for piece in self._speak(synthesis, speech):
                    yield piece
                for frame in speech.rest():
                    yield await speech.audio(frame)
            yield speech.chunk({}, audio=False, finish_reason="stop")
        finally:
            if synthesis is not None:
                await end_task(synthesis.task)
            ask.turn.noted().audio = speech.note(self.engine.name)


def unspoken(engine: str, exc: EngineError) -> ApiError:
    """A speech engine's failure, as the caller is told it (a 503: before the answer began,
    its status; after, the stream's error frame or apology, as for any failure)."""
    return ApiError(503, f"speech engine '{engine}' failed: {exc}")


class _Synthesis:
    """One sentence spoken by the engine, in a task of its own, its PCM queued as it comes.
    It starts once the sentence before it is done and being spoken: one engine at a time
    per answer, at most one sentence ahead of what the caller hears."""

    def __init__(self, sentence: str, engine: Engine, after: _Synthesis | None) -> None:
        self.sentence = sentence
        self.playing = asyncio.Event()
        self._out: asyncio.Queue[tuple[int, bytes] | EngineError | None] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._run(engine, after))

    async def _run(self, engine: Engine, after: _Synthesis | None) -> None:
        if after is not None:
            await asyncio.wait({after.task})
            await after.playing.wait()
        end: EngineError | None = None
        try:
            with tracing.span("tts.synthesize", engine=engine.name, characters=len(self.sentence)):
                async with aclosing(engine.synthesize(self.sentence)) as pieces:
                    seconds = 0.0  # of audio: a sentence's is bounded, however fast it comes
                    async for piece in pieces:
                        rate, pcm = piece
                        seconds += len(pcm) / 2 / max(rate, 1)
                        if seconds > MAX_SENTENCE_S:
                            raise EngineError(f"sent over {MAX_SENTENCE_S:g}s of audio at once")
                        self._out.put_nowait(piece)
        except EngineError as exc:
            end = exc
        except Exception as exc:  # an engine's own bug must end the sentence, not hang it
            end = EngineError(f"failed ({type(exc).__name__})")
        finally:
            self._out.put_nowait(end)  # (also when cancelled: nobody waits then)

    async def pcm(self, engine: str) -> AsyncIterator[tuple[int, bytes]]:
        while (item := await self._out.get()) is not None:
            if isinstance(item, EngineError):
                raise unspoken(engine, item)
            yield item


class _Upstream:
    """The model's own audio in a chunk: its transcript and its PCM (at `source_rate`)."""

    __slots__ = ("pcm", "transcript")

    def __init__(self, transcript: str, pcm: bytes) -> None:
        self.transcript = transcript
        self.pcm = pcm


class _Speech:
    """One answer's audio: its id, its frames, its pace, what the log line says of it."""

    def __init__(self, config: AudioConfig, ask: Ask) -> None:
        self.ask = ask
        self.config = config
        self.id = "audio_" + ask.turn.id.removeprefix("req_")
        self.framer = Framer(frame_size(config.sample_rate, config.chunk_ms))
        self.bytes_per_s = config.sample_rate * 2
        self.lead_s = config.lead_ms / 1000
        self.pacing = config.pace
        self._from_model: Resampler | None = None  # the model's own audio, if it sends any
        self.started: float | None = None  # when the first frame went out
        self.sent = 0  # bytes of audio sent
        self.first_audio_ms: float | None = None
        self.head = own_head(ask)
        self._followed = False

    def follow(self, piece: Piece) -> None:
        """Audio chunks carry the provider's id, created and model: one id in the stream."""
        view = piece.view
        if not self._followed and view.id:
            self.head = {"id": view.id, "created": view.created, "model": view.model}
            self._followed = True

    def chunk(
        self, delta: dict[str, Any], audio: bool = True, finish_reason: str | None = None
    ) -> Piece:
        return Piece.of(
            {
                **self.head,
                "object": "chat.completion.chunk",
                "choices": [
                    {
                        "index": 0,
                        "delta": {"audio": {"id": self.id, **delta}} if audio else delta,
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                ],
            }
        )

    def frames(self, pcm: bytes) -> list[bytes]:
        return self.framer.push(pcm)

    def upstream(self, pcm: bytes) -> bytes:
        """The model's own audio at the route's rate."""
        if self._from_model is None:
            self._from_model = Resampler(self.config.source_rate, self.config.sample_rate)
        return self._from_model.push(pcm)

    def rest(self) -> list[bytes]:
        """What is left when the answer ends: the model's audio still in the resampler,
        then the answer's last, shorter frame."""
        frames = []
        if self._from_model is not None:
            frames = self.framer.push(self._from_model.push(b"", last=True))
            self._from_model = None
        last = self.framer.flush()
        return [*frames, last] if last else frames

    async def audio(self, frame: bytes) -> Piece:
        """A frame's chunk, once it is due: no faster than real time, `lead_ms` ahead."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.started is None:
            self.started = now
            turn = self.ask.turn
            turn.first_audio = turn.elapsed()
            self.first_audio_ms = round(turn.first_audio * 1000, 2)
        if self.pacing:
            if self.started + self.sent / self.bytes_per_s < now:
                # The caller's player ran dry (a slow model, a tool): pace from now, or
                # everything until the clock caught up would go at once, unstoppable.
                self.started = now - self.sent / self.bytes_per_s
            due = self.started + self.sent / self.bytes_per_s - self.lead_s
            if due > now:
                await asyncio.sleep(due - now)
        self.sent += len(frame)
        return self.chunk({"data": base64.b64encode(frame).decode()})

    def note(self, engine: str) -> AudioNote:
        audio_s = round(self.sent / self.bytes_per_s, 3)
        return AudioNote(engine=engine, first_audio_ms=self.first_audio_ms, audio_s=audio_s)


def _split(piece: Piece) -> tuple[str, _Upstream | None, Piece | None]:
    """A piece's text, the model's own audio in it, and what of it still goes on: itself
    if it has neither, the piece without them if it has more (a role, tool calls, a
    finish, usage), else nothing."""
    texts: list[str] = []
    audio = False
    for c in piece.view.choices:
        if c.delta is None:
            continue
        if isinstance(c.delta.content, str) and c.delta.content:
            texts.append(c.delta.content)
        audio = audio or isinstance(c.delta.audio, dict)
    if not texts and not audio:
        return "", None, piece
    chunk = piece.decoded()
    keep = bool(chunk.get("usage"))
    transcript, pcm = "", b""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        delta.pop("content", None)
        given = delta.pop("audio", None)
        if isinstance(given, dict):
            if isinstance(given.get("transcript"), str):
                transcript += given["transcript"]
            if isinstance(given.get("data"), str):
                pcm += model_audio(given["data"])
        keep = keep or bool(delta) or bool(choice.get("finish_reason"))
    upstream = _Upstream(transcript, pcm) if audio else None
    return "".join(texts), upstream, Piece.of(chunk) if keep else None
