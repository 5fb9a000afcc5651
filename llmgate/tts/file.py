"""Agora's canned announcement as an engine: a fixed transcript and a PCM16 file, read with
aiofiles so the event loop never waits on the disk."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiofiles

from llmgate.tts.base import EngineError

READ = 64 * 1024


class FileEngine:
    name = "file"
    first_words: int | None = None

    def __init__(self, pcm_path: Path, text_path: Path | None, sample_rate: int) -> None:
        self.pcm_path = pcm_path
        self.text_path = text_path
        self.rate = sample_rate

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def check(self) -> None:
        pass

    async def transcript(self) -> str:
        if self.text_path is None:
            return ""
        try:
            async with aiofiles.open(self.text_path, encoding="utf-8") as f:
                return (await f.read()).strip()
        except OSError as exc:
            raise EngineError(f"{self.text_path}: cannot read ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise EngineError(f"{self.text_path}: not UTF-8 text") from None

    async def synthesize(self, text: str = "") -> AsyncIterator[tuple[int, bytes]]:
        """The file's PCM, whatever the text: a fixed announcement."""
        try:
            async with aiofiles.open(self.pcm_path, "rb") as f:
                while data := await f.read(READ):
                    yield self.rate, data
        except OSError as exc:
            raise EngineError(f"{self.pcm_path}: cannot read ({exc.strerror})") from None
