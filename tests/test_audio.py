"""An audio route: the answer spoken by espeak-ng, sentence by sentence, in the stream."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil

import aiohttp
import numpy as np
import pytest

from tests.conftest import API_KEY, eventually, stream_chunks
from tests.test_tts import children

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed"
)
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def audio_gateway(make_gateway, upstream):
    async def make(**voice):
        return await make_gateway(
            # only a hang-up can end a turn early here, never the provider's timeouts
            providers={"fake": {"base_url": upstream.url, "idle_timeout_s": 60}},
            audio={"voice": {"engine": "espeak", **voice}},
            routes=[{"path": "/audio/chat/completions", "audio": "voice"}],
        )

    return make


async def frames(gateway, model: str, stream: bool = True) -> list[dict]:
    body = {"model": model, "stream": stream, "messages": MESSAGES}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = gateway.make_url("/audio/chat/completions")
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=headers) as resp:
        raw = await resp.read()
    if not stream:
        return [json.loads(raw)]
    return stream_chunks(raw)


async def test_the_answer_is_spoken_in_exact_frames(audio_gateway):
    got = await frames(await audio_gateway(pace=False), "text")
    audio = [c["choices"][0]["delta"]["audio"] for c in got if c["choices"]
             and "audio" in c["choices"][0]["delta"]]
    assert len({a["id"] for a in audio}) == 1
    assert "transcript" in audio[0]  # a sentence's transcript comes before its audio
    transcript = " ".join(a["transcript"] for a in audio if "transcript" in a)
    assert transcript == "Hello there, h\u00e9llo!"  # speech-safe: the emoji is gone
    data = [base64.b64decode(a["data"]) for a in audio if "data" in a]
    assert all(len(d) == 1280 for d in data[:-1]) and 0 < len(data[-1]) <= 1280
    pcm = np.frombuffer(b"".join(data), "<i2")
    seconds = len(pcm) / 16000
    assert 0.5 < seconds < 5 and np.sqrt(np.mean(pcm.astype(float) ** 2)) > 300
    # the text is not sent twice (as content for the caller's TTS, and as audio)
    assert not any(c["choices"][0]["delta"].get("content") for c in got if c["choices"])
    assert got[0]["choices"][0]["delta"].get("role") == "assistant"
    assert got[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] and c["model"] for c in got)


async def test_the_openai_sdk_reads_the_audio_stream(audio_gateway, connect):
    gateway = await audio_gateway(pace=False, sample_rate=24000, chunk_ms=20)
    client = connect(gateway).with_options(base_url=str(gateway.make_url("/audio")))
    stream = await client.chat.completions.create(model="text", messages=MESSAGES, stream=True)
    chunks = [c async for c in stream]
    audio = [c.choices[0].delta.audio for c in chunks if c.choices and c.choices[0].delta.audio]
    assert audio[0].transcript and all(a.id == audio[0].id for a in audio)
    sizes = [len(base64.b64decode(a.data)) for a in audio if a.data]
    assert sizes and all(size == 960 for size in sizes[:-1])
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_frames_go_no_faster_than_real_time_past_the_lead(audio_gateway):
    body = {"model": "text", "stream": True, "messages": MESSAGES}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    gateway = await audio_gateway(lead_ms=100)
    url = gateway.make_url("/audio/chat/completions")
    arrivals, audio_bytes = [], 0
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=headers) as resp:
        loop = asyncio.get_running_loop()
        async for line in resp.content:
            if b'"data":' in line:
                arrivals.append(loop.time())
                chunk = json.loads(line[6:])
                audio_bytes += len(base64.b64decode(chunk["choices"][0]["delta"]["audio"]["data"]))
    seconds = audio_bytes / 32000
    assert seconds > 0.5
    # the last frame may leave `lead_ms` before its time, and no earlier
    assert arrivals[-1] - arrivals[0] >= seconds - 0.1 - 0.04 - 0.05


async def test_a_barge_in_stops_the_upstream_and_the_engine(audio_gateway, upstream):
    before = children()
    gateway = await audio_gateway(lead_ms=0)
    body = {"model": "speak-then-stall", "stream": True, "messages": MESSAGES}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            gateway.make_url("/audio/chat/completions"), json=body, headers=headers
        )
        async for line in resp.content:
            if b'"data":' in line:
                break  # the first audio frame: the caller barges in
        resp.close()
        await eventually(lambda: upstream.cancelled == 1)
    await eventually(lambda: children() == before)


async def test_a_non_streamed_answer_is_its_text(audio_gateway):
    [completion] = await frames(await audio_gateway(), "text", stream=False)
    assert completion["choices"][0]["message"]["content"] == "Hello there, h\u00e9llo!"


async def test_an_apology_for_a_dead_provider_is_spoken(make_gateway, upstream):
    gateway = await make_gateway(
        server={"on_stream_error": "apology"},
        providers={"fake": {"base_url": upstream.url, "idle_timeout_s": 0.3}},
        audio={"voice": {"engine": "espeak", "pace": False}},
        routes=[{"path": "/audio/chat/completions", "audio": "voice"}],
    )
    got = await frames(gateway, "stall-mid")  # two chunks, then silence
    audio = [c["choices"][0]["delta"]["audio"] for c in got if c["choices"]
             and "audio" in c["choices"][0]["delta"]]
    transcript = " ".join(a["transcript"] for a in audio if "transcript" in a)
    assert transcript.endswith("Sorry, I lost my connection. Could you say that again?")
    assert got[-1]["choices"][0]["finish_reason"] == "stop"
    spoken = sum(len(base64.b64decode(a["data"])) for a in audio if "data" in a)
    assert spoken / 32000 > 1.5  # the apology is audio, not only a transcript
