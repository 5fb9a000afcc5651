"""The audio scenario of scripts/bench: each engine's speed, through llmgate's audio route.

llmgate runs as its own process with one audio route per engine; the upstream is in this
process (sentences streamed a word every 20 ms, as a fast model writes) and so is the
client, so "the first sentence's last token was sent" and "the first audio frame arrived"
are read on one clock.

- first audio: from the upstream writing the first sentence's last word (its full stop)
  to the caller receiving the first audio frame. It includes the sentence splitter waiting
  for the next word (it cannot know "3." is not "3.5" before), one gap of 20 ms.
- real-time factor: seconds of speech each engine makes per second of synthesis, engine
  alone, in this process, on the same sentences.
- concurrency: N paced streams at once (lead 200 ms, 40 ms frames); a frame is late when it
  arrives more than lead_ms after its time on a clock that starts at the stream's first
  frame. N doubles until a stream has a late frame; the largest N with none is reported.

    python scripts/bench_audio.py [--quick] [--engines piper,espeak]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench import BENCH_LIMITS, PY, free_port, wait_http  # noqa: E402

SENTENCES = [
    "Our store on Main Street opens at nine in the morning on weekdays.",
    "On Saturdays we open an hour later, and on Sundays we are closed.",
    "You can also order online at any time, and delivery takes two days.",
]
SHORT = "We open at nine today."  # a first sentence short enough to be spoken whole
GAP_S = 0.02  # between words, as a fast model streams
CHUNK_MS, LEAD_MS = 40, 200
BUDGET_FIRST_AUDIO_MS = {"espeak": 150.0, "piper": 300.0}
BUDGET_RTF = {"espeak": 10.0, "piper": 3.0}


class Upstream:
    """Streams SENTENCES[:n] word by word; notes when each answer's first full stop went."""

    def __init__(self) -> None:
        self.sentence_end: dict[str, float] = {}  # request tag -> perf_counter
        self.first_word: dict[str, float] = {}
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.answer)

    async def answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        tag = body["messages"][-1]["content"]
        count, short, _ = tag.split("|", 2)  # the client says what answer it wants
        sentences = ([SHORT] if short == "short" else []) + SENTENCES
        self.first_word[tag] = time.perf_counter()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(delta: dict, finish: str | None = None) -> None:
            chunk = {
                "id": "chatcmpl-bench",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": "bench",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        await send({"role": "assistant", "content": ""})
        for i, sentence in enumerate(sentences[: int(count)]):
            words = sentence.split(" ")
            for j, word in enumerate(words):
                await send({"content": (" " if i or j else "") + word})
                if i == 0 and j == len(words) - 1:
                    self.sentence_end[tag] = time.perf_counter()
                await asyncio.sleep(GAP_S)
        await send({}, "stop")
        await resp.write(b"data: [DONE]\n\n")
        return resp


def _config(port: int, upstream_port: int, engines: list[str]) -> str:
    out = (
        f'[server]\nport = {port}\napi_keys = ["bench"]\n'
        + BENCH_LIMITS
        + f'[providers.up]\nbase_url = "http://127.0.0.1:{upstream_port}/v1"\n'
        "idle_timeout_s = 120\n"
    )
    for engine in engines:
        out += (
            f"[audio.{engine}]\nengine = \"{engine}\"\nchunk_ms = {CHUNK_MS}\n"
            f"lead_ms = {LEAD_MS}\n"
            f'[[routes]]\npath = "/{engine}/chat/completions"\naudio = "{engine}"\n'
        )
    return out


async def _one(
    session: aiohttp.ClientSession, url: str, name: str, sentences: int, short: bool = False
) -> dict:
    tag = f"{sentences}|{'short' if short else 'long'}|{name}"
    body = {"model": "bench", "stream": True, "messages": [{"role": "user", "content": tag}]}
    arrivals: list[float] = []
    async with session.post(url, json=body, headers={"Authorization": "Bearer bench"}) as resp:
        if resp.status != 200:
            raise SystemExit(f"bench audio: {url} answered {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if line.startswith(b"data: {") and b'"data":"' in line:
                arrivals.append(time.perf_counter())
                chunk = json.loads(line[6:])
                base64.b64decode(chunk["choices"][0]["delta"]["audio"]["data"])
    return {"arrivals": arrivals, "tag": tag}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


async def _first_audio(url: str, upstream: Upstream, runs: int) -> dict:
    """A 13-word first sentence (its first five words may go ahead, cut early) and a
    5-word one (spoken whole): first audio after each one's full stop, and after the
    answer's first word."""
    out = {}
    async with aiohttp.ClientSession() as session:
        for short in (False, True):
            after_end, after_first = [], []
            for i in range(runs + (2 if runs > 1 else 0)):
                got = await _one(session, url, f"first-{i}", 1, short)
                if i >= 2 or runs == 1:  # two warm-up turns
                    first = got["arrivals"][0]
                    after_end.append((first - upstream.sentence_end[got["tag"]]) * 1000)
                    after_first.append((first - upstream.first_word[got["tag"]]) * 1000)
            kind = "short" if short else "long"
            out[f"first_audio_{kind}_p50_ms"] = _pct(after_end, 0.5)
            out[f"first_audio_{kind}_max_ms"] = _pct(after_end, 1.0)
            out[f"first_audio_{kind}_after_first_word_p50_ms"] = _pct(after_first, 0.5)
    return out


async def _concurrent(url: str, limit: int, sentences: int = 2) -> dict:
    """The most paced streams at once with no frame late by more than lead_ms."""
    best, tried = 0, []
    n = 1
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        while n <= limit:
            runs = await asyncio.gather(
                *(_one(session, url, f"c{n}-{k}-{time.time()}", sentences) for k in range(n))
            )
            worst = 0.0
            for run in runs:
                t0 = run["arrivals"][0]
                for k, at in enumerate(run["arrivals"]):
                    worst = max(worst, (at - (t0 + k * CHUNK_MS / 1000)) * 1000)
            tried.append({"streams": n, "worst_late_ms": round(worst, 1)})
            if worst > LEAD_MS:
                break
            best = n
            n *= 2
    return {"max_paced_streams": best, "paced_trials": tried}


async def _rtf(engine_name: str, quick: bool = False) -> dict:
    from llmgate.tts.espeak import EspeakEngine
    from llmgate.tts.piper import PiperEngine

    engine = PiperEngine() if engine_name == "piper" else EspeakEngine()
    await engine.start()
    audio_s = wall = 0.0
    try:
        for sentence in SENTENCES[:1] if quick else SENTENCES * 2:
            t = time.perf_counter()
            async for rate, pcm in engine.synthesize(sentence):
                audio_s += len(pcm) / 2 / rate
            wall += time.perf_counter() - t
    finally:
        await engine.aclose()
    return {"rtf": round(audio_s / wall, 1), "rtf_audio_s": round(audio_s, 2)}


async def run(engines: list[str], quick: bool = False) -> dict:
    upstream = Upstream()
    runner = web.AppRunner(upstream.app)
    await runner.setup()
    upstream_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port).start()
    workdir = Path(tempfile.mkdtemp(prefix="llmgate-bench-audio-"))
    port = free_port()
    (workdir / "audio.toml").write_text(_config(port, upstream_port, engines))
    log = open(workdir / "llmgate.log", "w")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [PY, "-m", "llmgate", "--config", str(workdir / "audio.toml")],
        stderr=log,
        cwd=HERE.parent,
    )
    results: dict = {}
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/healthz", 60.0)
        for engine in engines:
            url = f"http://127.0.0.1:{port}/{engine}/chat/completions"
            out = await _first_audio(url, upstream, 1 if quick else 20)
            out.update(await _rtf(engine, quick))
            out.update(await (_concurrent(url, 1, 1) if quick else _concurrent(url, 64)))
            results[engine] = out
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        await runner.cleanup()
    return results


def checks(results: dict) -> list[tuple[str, bool, str]]:
    out = []
    for engine, r in results.items():
        limit = BUDGET_FIRST_AUDIO_MS[engine]
        for kind, words in (("long", 13), ("short", 5)):
            first = r[f"first_audio_{kind}_p50_ms"]
            ok = first is not None and first <= limit
            label = f"audio {engine}: first audio p50 <= {limit:g} ms after a {words}-word sentence"
            out.append((label, ok, f"{first} ms"))
        rtf, least = r["rtf"], BUDGET_RTF[engine]
        out.append((f"audio {engine}: synthesis >= {least:g}x real time", rtf >= least, f"{rtf}x"))
        streams = r["max_paced_streams"]
        out.append(
            (f"audio {engine}: paced streams with no frame late", streams >= 1, str(streams))
        )
    return out


def available() -> list[str]:
    return ["piper", *(["espeak"] if shutil.which("espeak-ng") else [])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--engines", default=",".join(available()))
    args = parser.parse_args()
    results = asyncio.run(run(args.engines.split(","), args.quick))
    print(json.dumps(results, indent=2))
    for label, ok, value in checks(results):
        print(f"{'PASS' if ok else 'MISS'}  {label}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
