"""An audio route reads its provider only a little ahead of what the caller has heard: a
fast (or hostile) provider is held back, not buffered and synthesised whole."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from llmgate.config import EspeakAudio
from llmgate.errors import ApiError
from llmgate.pipeline import Ask, Piece
from llmgate.stages import audio
from llmgate.stages.audio import AHEAD, AudioStage
from llmgate.turn import Turn
from tests.fake_upstream import chunk, tone


class _Quick:
    name = "quick"
    first_words = None

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def check(self) -> None: ...

    async def synthesize(self, text: str) -> AsyncIterator[tuple[int, bytes]]:
        yield 16000, tone(0.2, rate=16000)


async def test_a_flood_of_sentences_is_read_only_a_little_ahead(monkeypatch):
    made: list[str] = []
    original = audio._Synthesis.__init__

    def counted(self, sentence, engine, after):  # type: ignore[no-untyped-def]
        made.append(sentence)
        original(self, sentence, engine, after)

    monkeypatch.setattr(audio._Synthesis, "__init__", counted)
    read = []

    async def provider(ask: Ask) -> AsyncIterator[Piece]:
        for i in range(20_000):  # 20,000 sentences as fast as it can
            read.append(i)
            yield Piece.of(chunk("m", {"content": f"Sentence {i} here. "}))
        yield Piece.of(chunk("m", {}, "stop"))

    stage = AudioStage(EspeakAudio(pace=False), _Quick())  # type: ignore[arg-type]
    ask = Ask({"model": "m"}, Turn("/audio"), None, None, None)  # type: ignore[arg-type]
    items = stage.wrap(provider)(ask)
    for _ in range(5):  # the caller has heard five pieces
        await anext(items)
    await items.aclose()
    assert len(made) <= AHEAD + 4, len(made)  # (was 20,000: every sentence at once)
    assert len(read) <= AHEAD + 8, len(read)


class _Endless(_Quick):
    async def synthesize(self, text: str) -> AsyncIterator[tuple[int, bytes]]:
        while True:  # a speech endpoint that never stops sending PCM, as fast as it can
            await asyncio.sleep(0)  # (a network read)
            yield 16000, b"\0" * 32000  # a second at a time


async def test_one_sentences_audio_is_bounded(monkeypatch):
    monkeypatch.setattr(audio, "MAX_SENTENCE_S", 5.0)

    async def provider(ask: Ask) -> AsyncIterator[Piece]:
        yield Piece.of(chunk("m", {"content": "One sentence. "}))
        yield Piece.of(chunk("m", {}, "stop"))

    stage = AudioStage(EspeakAudio(pace=False), _Endless())  # type: ignore[arg-type]
    ask = Ask({"model": "m"}, Turn("/audio"), None, None, None)  # type: ignore[arg-type]
    frames = 0

    async def hear() -> None:
        nonlocal frames
        async for piece in stage.wrap(provider)(ask):
            frames += b'"data"' in piece.data

    with pytest.raises(ApiError, match="audio at once"):
        await asyncio.wait_for(hear(), 5)  # (without the bound: never over)
    assert frames < 400  # 5 s of 40 ms frames, then the engine's failure
