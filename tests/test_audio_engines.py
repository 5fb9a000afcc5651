"""The audio route with each engine: piper (real neural synthesis), an OpenAI-compatible
/audio/speech, a fixed file, the model's own audio passed through; and synthesis that runs
one sentence ahead of what the caller hears."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import numpy as np
import pytest

from llmgate.app import LIVE
from llmgate.config import EspeakAudio
from llmgate.pipeline import Ask, Piece
from llmgate.stages.audio import AudioStage
from llmgate.tts.piper import PiperEngine
from llmgate.turn import Turn
from tests.conftest import API_KEY, eventually, stream_chunks
from tests.fake_upstream import TOOL_CALL_DELTAS, chunk, tone
from tests.test_cancellation import agora_body

MESSAGES = [{"role": "user", "content": "hi"}]
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def voice_gateway(make_gateway, upstream):
    async def make(providers=None, **voice):
        return await make_gateway(
            providers=providers or {"fake": {"base_url": upstream.url, "idle_timeout_s": 60}},
            audio={"voice": voice},
            routes=[{"path": "/audio/chat/completions", "audio": "voice"}],
        )

    return make


async def post(gateway, model: str = "text", stream: bool = True) -> tuple[int, bytes]:
    body = {"model": model, "stream": stream, "messages": MESSAGES}
    url = gateway.make_url("/audio/chat/completions")
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=HEADERS) as resp:
        return resp.status, await resp.read()


def audio_of(chunks: list[dict]) -> tuple[list[str], list[bytes]]:
    """(transcripts, frames) of a stream's delta.audio, every one with the same id."""
    audio = [
        c["choices"][0]["delta"]["audio"]
        for c in chunks
        if c["choices"] and "audio" in c["choices"][0]["delta"]
    ]
    assert len({a["id"] for a in audio}) == 1
    transcripts = [a["transcript"] for a in audio if "transcript" in a]
    return transcripts, [base64.b64decode(a["data"]) for a in audio if "data" in a]


def loudness(pcm: bytes) -> float:
    return float(np.sqrt(np.mean(np.frombuffer(pcm, "<i2").astype(np.float64) ** 2)))


async def test_piper_speaks_the_answer(voice_gateway):
    gateway = await voice_gateway(engine="piper", pace=False)
    status, raw = await post(gateway)
    assert status == 200
    chunks = stream_chunks(raw)
    transcripts, data = audio_of(chunks)
    assert " ".join(transcripts) == "Hello there, h\u00e9llo!"
    assert all(len(d) == 1280 for d in data[:-1]) and 0 < len(data[-1]) <= 1280
    seconds = sum(map(len, data)) / 32000
    assert 0.6 < seconds < 4 and loudness(b"".join(data)) > 300  # three words, spoken
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert {(c["id"], c["created"]) for c in chunks} == {("chatcmpl-fake", 1_700_000_000)}


async def test_piper_loads_its_voice_once_at_start_up(voice_gateway):
    gateway = await voice_gateway(engine="piper")
    [engine] = gateway.app[LIVE].current.engines.values()
    assert isinstance(engine, PiperEngine) and engine.voice is not None  # before any request
    other = await voice_gateway(engine="piper")
    assert other.app[LIVE].current.engines["voice"].voice is engine.voice  # one model in memory


async def test_a_barge_in_leaves_no_piper_thread_working(voice_gateway, upstream):
    gateway = await voice_gateway(engine="piper", lead_ms=0, max_words=40)
    [engine] = gateway.app[LIVE].current.engines.values()
    body = {"model": "speak-then-stall", "stream": True, "messages": MESSAGES}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            gateway.make_url("/audio/chat/completions"), json=body, headers=HEADERS
        )
        async for line in resp.content:
            if b'"data":' in line:
                break  # the first audio: the caller barges in while piper works on the next
        resp.close()
        await eventually(lambda: upstream.cancelled == 1)
    await eventually(lambda: engine.busy() == 0, timeout=0.1)  # not the sentence's end


async def test_a_missing_piper_voice_is_a_503_that_says_why(voice_gateway, tmp_path):
    gateway = await voice_gateway(engine="piper", voice=str(tmp_path / "nope.onnx"))
    status, raw = await post(gateway)
    assert status == 503
    assert "nope.onnx: no such file" in json.loads(raw)["error"]["message"]


async def test_the_openai_engine_streams_speech_from_an_endpoint(voice_gateway, upstream):
    providers = {
        "fake": {"base_url": upstream.url, "idle_timeout_s": 60},
        "voice": {"base_url": upstream.url, "api_key": "speech-secret"},
    }
    gateway = await voice_gateway(
        providers, engine="openai", provider="voice", model="tts-1", voice="nova", pace=False
    )
    status, raw = await post(gateway)
    assert status == 200
    transcripts, data = audio_of(stream_chunks(raw))
    [asked] = upstream.speech_requests
    assert asked == {
        "model": "tts-1",
        "voice": "nova",
        "input": "Hello there, h\u00e9llo!",
        "response_format": "pcm",
        "authorization": "Bearer speech-secret",
    }
    assert transcripts == ["Hello there, h\u00e9llo!"]
    # 50 ms a character at 24 kHz, resampled to 16 kHz and cut in 40 ms frames
    assert all(len(d) == 1280 for d in data[:-1])
    assert sum(map(len, data)) == pytest.approx(0.05 * len(asked["input"]) * 32000, abs=64)
    assert loudness(b"".join(data)) > 3000


async def test_a_failing_speech_endpoint_is_an_error_frame(voice_gateway, upstream):
    providers = {
        "fake": {"base_url": upstream.url, "idle_timeout_s": 60},
        "voice": {"base_url": upstream.url},
    }
    gateway = await voice_gateway(providers, engine="openai", provider="voice", voice="fail")
    status, raw = await post(gateway)
    assert status == 200  # the answer had begun (the role went out)
    error = json.loads(raw.rsplit(b"data: ", 1)[1])["error"]
    assert "speech engine 'openai' failed" in error["message"]
    assert "unknown voice" in error["message"] and "sk-abcdef" not in error["message"]
    assert b"[DONE]" not in raw


async def test_a_barge_in_closes_the_speech_request(voice_gateway, upstream):
    providers = {
        "fake": {"base_url": upstream.url, "idle_timeout_s": 60},
        "voice": {"base_url": upstream.url},
    }
    gateway = await voice_gateway(providers, engine="openai", provider="voice", voice="slow")
    body = {"model": "text", "stream": True, "messages": MESSAGES}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            gateway.make_url("/audio/chat/completions"), json=body, headers=HEADERS
        )
        async for line in resp.content:
            if b'"data":' in line and b'"audio"' in line:
                break
        await eventually(lambda: upstream.speech_open == 1)
        resp.close()
    await eventually(lambda: upstream.speech_open == 0, timeout=2)


async def test_the_file_engine_plays_its_announcement_without_asking_the_model(
    voice_gateway, upstream, tmp_path
):
    (tmp_path / "closed.pcm").write_bytes(tone(0.5, rate=8000))
    (tmp_path / "closed.txt").write_text("We are closed today. Please call back tomorrow.\n")
    gateway = await voice_gateway(
        engine="file",
        pcm_file=str(tmp_path / "closed.pcm"),
        text_file=str(tmp_path / "closed.txt"),
        file_rate=8000,
        pace=False,
    )
    status, raw = await post(gateway)
    assert status == 200
    chunks = stream_chunks(raw)
    transcripts, data = audio_of(chunks)
    assert transcripts == ["We are closed today. Please call back tomorrow."]
    assert sum(map(len, data)) == pytest.approx(0.5 * 32000, abs=64)  # 8 kHz made 16 kHz
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert upstream.requests == []
    status, raw = await post(gateway, stream=False)
    message = json.loads(raw)["choices"][0]["message"]
    assert message["content"] == "We are closed today. Please call back tomorrow."


async def test_the_models_own_audio_is_resampled_and_reframed(voice_gateway, connect):
    gateway = await voice_gateway(engine="piper", pace=False)
    status, raw = await post(gateway, "audio")
    assert status == 200
    transcripts, data = audio_of(stream_chunks(raw))
    assert transcripts == ["Hello", " there."]
    # 0.5 s at 24 kHz in reads of uneven size: 0.5 s at 16 kHz in whole 40 ms frames
    assert [len(d) for d in data] == [1280] * 12 + [16000 - 12 * 1280]
    assert loudness(b"".join(data)) > 3000
    # and the openai SDK reads it
    client = connect(gateway).with_options(base_url=str(gateway.make_url("/audio")))
    stream = await client.chat.completions.create(model="audio", messages=MESSAGES, stream=True)
    chunks = [c async for c in stream]
    audio = [c.choices[0].delta.audio for c in chunks if c.choices and c.choices[0].delta.audio]
    assert audio and all(a.id == audio[0].id for a in audio)
    assert chunks[-1].choices[0].finish_reason == "stop"
    # not streamed: the one message.audio, its base64 pieces decoded and joined
    status, raw = await post(gateway, "audio", stream=False)
    audio = json.loads(raw)["choices"][0]["message"]["audio"]
    assert audio["transcript"] == "Hello there." and audio["id"] == "audio_up"
    assert base64.b64decode(audio["data"]) == tone(0.5) and audio["expires_at"] == 1_700_003_600


class _Slow:
    """An engine that makes 0.5 s of audio in 50 ms and notes when each sentence began."""

    name = "slow"
    first_words = None

    def __init__(self) -> None:
        self.began: dict[str, float] = {}

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def check(self) -> None: ...

    async def synthesize(self, text: str) -> AsyncIterator[tuple[int, bytes]]:
        self.began[text] = time.perf_counter()
        await asyncio.sleep(0.05)
        yield 16000, tone(0.5, rate=16000)


async def test_the_next_sentence_is_synthesised_while_this_one_is_spoken(upstream):
    engine = _Slow()
    stage = AudioStage(EspeakAudio(lead_ms=0), engine)

    async def provider(ask: Ask) -> AsyncIterator[Piece]:
        for text in ["First one here. ", "Second one here. ", "Third one here."]:
            yield Piece.of(chunk("m", {"content": text}))
        yield Piece.of(chunk("m", {}, "stop"))

    ask = Ask({"model": "m"}, Turn("/audio"), None, None, None)  # type: ignore[arg-type]
    sent: list[tuple[float, dict]] = []
    async for piece in stage.wrap(provider)(ask):
        sent.append((time.perf_counter(), json.loads(piece.data)))
    frames = [t for t, c in sent if "data" in c["choices"][0]["delta"].get("audio", {})]
    first_end = frames[len(frames) // 3 - 1]  # the first sentence's last frame
    # the second began while the first was still being spoken, not after it
    assert engine.began["Second one here."] < first_end - 0.2
    # but not before the first was being spoken: one sentence ahead, no more
    assert engine.began["Third one here."] > frames[0] + 0.3


async def test_tool_calls_pass_through_the_audio_route_unchanged(voice_gateway):
    gateway = await voice_gateway(engine="piper")
    status, raw = await post(gateway, "tools")
    assert status == 200
    chunks = stream_chunks(raw)
    calls = [c["choices"][0]["delta"]["tool_calls"] for c in chunks
             if c["choices"][0]["delta"].get("tool_calls")]
    assert calls == [d["tool_calls"] for d in TOOL_CALL_DELTAS]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any("audio" in c["choices"][0]["delta"] for c in chunks)  # nothing to say


async def test_a_newer_turn_on_the_channel_stops_the_older_ones_speech(voice_gateway, upstream):
    gateway = await voice_gateway(engine="piper", lead_ms=0)
    [engine] = gateway.app[LIVE].current.engines.values()
    url = gateway.make_url("/audio/chat/completions")
    async with aiohttp.ClientSession() as session:
        old = await session.post(url, data=agora_body("speak-then-stall", 1), headers=HEADERS)
        async for line in old.content:
            if b'"data":"' in line:
                break  # the older answer is being spoken
        async with session.post(url, data=agora_body("text", 2), headers=HEADERS) as new:
            assert (await new.read()).endswith(b"data: [DONE]\n\n")
        await eventually(lambda: upstream.cancelled == 1)
        assert b"[DONE]" not in await old.read()
    await eventually(lambda: engine.busy() == 0, timeout=1)


class _Broken(_Slow):
    """An engine with a bug of its own (not an EngineError)."""

    async def synthesize(self, text: str) -> AsyncIterator[tuple[int, bytes]]:
        raise RuntimeError("engine bug")
        yield 16000, b""  # (an async generator)


def _speaking(texts_and_gaps: list) -> object:
    async def provider(ask: Ask) -> AsyncIterator[Piece]:
        for item in texts_and_gaps:
            if isinstance(item, float):
                await asyncio.sleep(item)
            else:
                yield Piece.of(chunk("m", {"content": item}))
        yield Piece.of(chunk("m", {}, "stop"))

    return provider


async def test_an_engines_own_bug_ends_the_answer_with_an_error_not_a_hang():
    from llmgate.errors import ApiError

    stage = AudioStage(EspeakAudio(pace=False), _Broken())
    ask = Ask({"model": "m"}, Turn("/audio"), None, None, None)  # type: ignore[arg-type]
    with pytest.raises(ApiError, match="speech engine 'slow' failed"):
        async with asyncio.timeout(2):
            async for _ in stage.wrap(_speaking(["Hello there. ", "Bye."]))(ask):
                pass


async def test_after_a_gap_pacing_starts_again_from_now():
    engine = _Slow()  # 0.5 s of audio a sentence
    stage = AudioStage(EspeakAudio(lead_ms=100), engine)
    ask = Ask({"model": "m"}, Turn("/audio"), None, None, None)  # type: ignore[arg-type]
    sent: list[tuple[float, dict]] = []
    provider = _speaking(["First one here. Then", 1.5, " more here. ", "Bye."])
    async for piece in stage.wrap(provider)(ask):
        sent.append((time.perf_counter(), json.loads(piece.data)))
    frames = [t for t, c in sent if "data" in c["choices"][0]["delta"].get("audio", {})]
    second = frames[len(frames) // 3 :]  # the second sentence's and the third's frames
    # they still go out at real time (0.04 s a frame) less the lead, not in one burst
    assert second[-1] - second[0] >= len(second) * 0.04 - 0.1 - 0.05
