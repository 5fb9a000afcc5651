"""espeak-ng (the Debian package) as a speech engine: light, fast, robotic.

One process per sentence, the text on its stdin (never on its command line), its WAV on
stdout read as it comes. A cancelled synthesis (the caller barged in) kills the process.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator

from llmgate.tts.pcm import wav_data_offset

READ = 16 * 1024


class EngineError(Exception):
    """A speech engine that cannot run or failed; the message says which and why."""


class EspeakEngine:
    name = "espeak"

    def __init__(self, voice: str = "", words_per_minute: int = 175) -> None:
        self.binary = shutil.which("espeak-ng") or shutil.which("espeak")
        self.voice = voice or "en-us"
        self.words_per_minute = words_per_minute

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
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(text.encode() + b"\n")
            proc.stdin.close()
            head = b""
            found = None
            while found is None:
                data = await proc.stdout.read(READ)
                if not data:
                    raise EngineError("espeak-ng ended before its audio")
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
                raise EngineError(f"espeak-ng exited with status {proc.returncode}")
        finally:
            if proc.returncode is None:
                proc.kill()  # barge-in, or a failure: no engine keeps talking
                await proc.wait()
