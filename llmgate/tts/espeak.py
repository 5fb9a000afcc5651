"""espeak-ng (the Debian package) as a speech engine: light, fast, robotic.

One process per sentence, the text on its stdin (never on its command line), its WAV on
stdout read as it comes. A cancelled synthesis (the caller barged in) kills the process.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator

from llmgate.tts.base import EngineError
from llmgate.tts.pcm import wav_data_offset

READ = 16 * 1024
WARM_UP = "Ready."


class EspeakEngine:
    name = "espeak"
    first_words: int | None = None

    def __init__(self, voice: str = "", words_per_minute: int = 175) -> None:
        self.binary = shutil.which("espeak-ng") or shutil.which("espeak")
        self.voice = voice or "en-us"
        self.words_per_minute = words_per_minute

    async def start(self) -> None:
        """Speak a word once: a process's first run reads the voice's files (~105 ms here,
        15 ms after), which a caller's first waiting phrase would otherwise wait for."""
        self.check()
        async for _ in self.synthesize(WARM_UP):
            pass

    async def aclose(self) -> None:
        pass

    def check(self) -> None:
        if self.binary is None:
            raise EngineError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")

    async def synthesize(self, text: str) -> AsyncIterator[tuple[int, bytes]]:
        """(sample rate, PCM16 mono) pieces of `text` spoken."""
        self.check()
        assert self.binary is not None
        proc = await asyncio.create_subprocess_exec(
            self.binary, "--stdout", "-v", self.voice, "-s", str(self.words_per_minute),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdin is not None and proc.stdout is not None
            # espeak-ng reads [[...]] as phonemes: a wiki-style link must be read as text
            proc.stdin.write(text.replace("[[", "[ [").encode() + b"\n")
            proc.stdin.close()
            head = b""
            found = None
            while found is None:
                data = await proc.stdout.read(READ)
                if not data:
                    raise EngineError(f"espeak-ng gave no audio ({await _said(proc)})")
                head += data
                try:
                    found = wav_data_offset(head)
                except ValueError as exc:
                    raise EngineError(f"espeak-ng: {exc}") from None
            rate, start = found
            if len(head) > start:
                yield rate, head[start:]
            while data := await proc.stdout.read(READ):
                yield rate, data
            if await proc.wait() != 0:
                raise EngineError(f"espeak-ng exited with {proc.returncode} ({await _said(proc)})")
        finally:
            if proc.returncode is None:
                proc.kill()  # barge-in, or a failure: no engine keeps talking
                await proc.wait()


async def _said(proc: asyncio.subprocess.Process) -> str:
    """The last of what espeak-ng wrote to stderr (a bad voice name, say)."""
    if proc.stderr is None:
        return ""
    text = (await proc.stderr.read(4096)).decode(errors="replace").strip()
    return text.splitlines()[-1][:200] if text else "nothing said"
