"""Speech engines and PCM: exact frames, resampling, real espeak-ng synthesis, barge-in."""

from __future__ import annotations

import os
import shutil
from contextlib import aclosing
from pathlib import Path

import numpy as np
import pytest

from llmgate.tts.espeak import EngineError, EspeakEngine
from llmgate.tts.file import FileEngine
from llmgate.tts.pcm import Framer, Resampler, frame_size, wav_data_offset

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng is not installed (apt-get install espeak-ng)",
)


def test_frames_are_exactly_the_size_agora_expects():
    assert frame_size(16000, 40) == 1280 and frame_size(24000, 20) == 960
    assert frame_size(22050, 10) == 440  # whole samples, never half of one
    framer = Framer(1280)
    frames = framer.push(b"\x01" * 3000) + framer.push(b"\x02" * 1000)
    assert [len(f) for f in frames] == [1280, 1280, 1280]
    assert len(framer.flush()) == 4000 - 3 * 1280
    assert framer.flush() == b""


def tone(rate: int, seconds: float) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes()


def test_resampling_in_chunks_gives_the_length_of_the_new_rate():
    pcm = tone(22050, 1.0)
    resampler = Resampler(22050, 16000)
    pieces = [pcm[i : i + 1001] for i in range(0, len(pcm), 1001)]  # odd sizes: half samples
    out = b"".join(resampler.push(p) for p in pieces) + resampler.push(b"", last=True)
    assert abs(len(out) // 2 - 16000) <= 2
    assert np.abs(np.frombuffer(out, "<i2")).max() > 6000  # the tone survived
    assert Resampler(16000, 16000).push(b"ab") == b"ab"


def test_wav_headers():
    head = (b"RIFF\x24\xf0\xff\x7fWAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x22\x56\x00\x00"
            b"\x44\xac\x00\x00\x02\x00\x10\x00data\x00\xf0\xff\x7f")
    assert wav_data_offset(head) == (22050, 44)
    assert wav_data_offset(head[:30]) is None
    with pytest.raises(ValueError):
        wav_data_offset(b"ID3\x03" + b"\x00" * 40)


async def spoken(engine: EspeakEngine, text: str) -> tuple[int, bytes]:
    rates, pcm = set(), b""
    async with aclosing(engine.synthesize(text)) as pieces:
        async for rate, data in pieces:
            rates.add(rate)
            pcm += data
    [rate] = rates
    return rate, pcm


@needs_espeak
async def test_espeak_speaks_the_text():
    rate, pcm = await spoken(EspeakEngine(), "Hello world, this is a test of the voice.")
    samples = np.frombuffer(pcm, "<i2")
    seconds = len(samples) / rate
    assert rate == 22050 and 1.0 < seconds < 6.0
    assert np.sqrt(np.mean(samples.astype(np.float64) ** 2)) > 300  # not silence


def children() -> list[str]:
    me = str(os.getpid())
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[1] == me:
            out.append(pid)
    return out


@needs_espeak
async def test_a_barge_in_kills_the_engine_at_once():
    before = children()
    engine = EspeakEngine()
    pieces = engine.synthesize("A long answer. " * 200)
    await anext(pieces)  # it has begun talking
    assert len(children()) == len(before) + 1
    await pieces.aclose()  # the caller barged in
    assert children() == before


async def test_a_missing_espeak_is_a_clear_error():
    engine = EspeakEngine()
    engine.binary = None
    with pytest.raises(EngineError, match="apt-get install espeak-ng"):
        await anext(engine.synthesize("hi"))


async def test_the_file_engine_reads_its_pcm_and_transcript(tmp_path):
    (tmp_path / "a.pcm").write_bytes(tone(16000, 0.5))
    (tmp_path / "a.txt").write_text("Welcome to Lumen.\n")
    engine = FileEngine(tmp_path / "a.pcm", tmp_path / "a.txt", 16000)
    assert await engine.transcript() == "Welcome to Lumen."
    pcm = b"".join([data async for _, data in engine.synthesize()])
    assert pcm == tone(16000, 0.5)
    with pytest.raises(EngineError, match=r"missing\.pcm"):
        await anext(FileEngine(tmp_path / "missing.pcm", None, 16000).synthesize())


@needs_espeak
async def test_a_bad_voice_says_why():
    with pytest.raises(EngineError) as info:
        await spoken(EspeakEngine(voice="zz-nope"), "Hello.")
    assert "zz-nope" in str(info.value) or "voice" in str(info.value).lower()


def test_a_full_scale_voice_resampled_does_not_clip():
    """Piper normalises each sentence to full scale, and resampling overshoots it (by
    ~3.5% here): no sample may be flattened at the int16 limits (they were, 3 to 7 a
    sentence, at -32768)."""
    from piper import PiperVoice

    from llmgate.tts.piper import default_model

    voice = PiperVoice.load(default_model())
    text = "Dr. Smith opens the clinic at nine. Please bring your card, and arrive early!"
    pcm = b"".join(c.audio_int16_bytes for c in voice.synthesize(text))
    assert np.abs(np.frombuffer(pcm, "<i2")).max() >= 32700  # full scale going in
    for to in (16000, 24000, 48000):
        resampler = Resampler(voice.config.sample_rate, to)
        pieces = [pcm[i : i + 4001] for i in range(0, len(pcm), 4001)]
        out = b"".join(resampler.push(p) for p in pieces) + resampler.push(b"", last=True)
        samples = np.frombuffer(out, "<i2")
        assert samples.min() > -32768 and samples.max() < 32767, to
        assert np.abs(samples).max() > 25000  # still loud


def test_piper_speaks_once_when_it_starts():
    """Loading a voice includes one short synthesis (onnxruntime's first run is the slow
    one): the first caller after start-up gets a warm model. In a process of its own,
    where no voice is loaded yet."""
    import subprocess
    import sys

    code = (
        "import asyncio\n"
        "from piper import PiperVoice\n"
        "from llmgate.tts.piper import PiperEngine\n"
        "said = []\n"
        "original = PiperVoice.synthesize\n"
        "def counted(self, text, *a, **k):\n"
        "    said.append(text)\n"
        "    return original(self, text, *a, **k)\n"
        "PiperVoice.synthesize = counted\n"
        "async def main():\n"
        "    engine = PiperEngine()\n"
        "    await engine.start()\n"
        "    await engine.aclose()\n"
        "asyncio.run(main())\n"
        "print(said)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "['Ready.']", out.stdout + out.stderr


async def test_espeak_speaks_once_when_it_starts(monkeypatch):
    from llmgate.tts.espeak import EspeakEngine

    said: list[str] = []

    async def synthesize(self, text):  # type: ignore[no-untyped-def]
        said.append(text)
        yield 22050, b"\0\0"

    monkeypatch.setattr(EspeakEngine, "synthesize", synthesize)
    engine = EspeakEngine()
    engine.binary = "/usr/bin/espeak-ng"  # (its presence is not what this checks)
    await engine.start()
    assert said == ["Ready."]
