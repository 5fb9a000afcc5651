"""A hostile provider's huge delta: the longest the event loop is held while llmgate cleans it.

One content delta of N MB (markdown, links, sentences) from an in-process upstream goes
through a speech route (read to the end) and an espeak audio route (read to the first
audio frame, then hung up on); a ticker in the same loop notes the longest gap between its
5 ms ticks. A slice of the delta is about 10 ms of work; before the speech stage cut the
work in slices, 7 MB held the loop for seconds (and the sentence splitter for minutes).

    python scripts/bench_loop_gap.py [--mb 7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmgate.app import create_app
from llmgate.config import parse

UNIT = "**Bold** words and [a link](https://x.example/a) here. "


def _chunk(delta: dict, finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-huge", "object": "chat.completion.chunk", "created": 1700000000,
        "model": "huge", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def _largest_gap(url: str, until_audio: bool) -> tuple[float, float]:
    """(the longest gap between ticks in ms, the request's seconds)."""
    loop = asyncio.get_running_loop()
    gaps = [0.0]

    async def tick() -> None:
        last = loop.time()
        while True:
            await asyncio.sleep(0.005)
            gaps.append(loop.time() - last)
            last = loop.time()

    ticker = asyncio.ensure_future(tick())
    started = time.perf_counter()
    body = {"model": "huge", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with aiohttp.ClientSession() as s, s.post(
            url, json=body, headers={"Authorization": "Bearer bench"}
        ) as resp:
            async for line in resp.content:
                if until_audio and b'"data":"' in line:
                    break
    finally:
        ticker.cancel()
    return round(max(gaps) * 1000, 1), round(time.perf_counter() - started, 2)


async def run(mb: float) -> dict:
    text = UNIT * int(mb * 1e6 / len(UNIT))

    async def answer(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_chunk({"role": "assistant", "content": text}))
        await resp.write(_chunk({}, "stop") + b"data: [DONE]\n\n")
        return resp

    upstream_app = web.Application()
    upstream_app.router.add_post("/v1/chat/completions", answer)
    upstream = TestServer(upstream_app)
    await upstream.start_server()
    routes = [{"path": "/speech/chat/completions", "speech": True}]
    raw: dict = {
        "server": {"api_keys": ["bench"]},
        "providers": {
            "up": {
                "base_url": str(upstream.make_url("/v1")),
                "models": ["huge"],
                "idle_timeout_s": 120,
            }
        },
        "routes": routes,
    }
    if shutil.which("espeak-ng"):
        raw["audio"] = {"voice": {"engine": "espeak"}}
        routes.append({"path": "/audio/chat/completions", "audio": "voice"})
    gateway = TestServer(create_app(parse(raw, {})))
    await gateway.start_server()
    out: dict = {"delta_mb": round(len(text) / 1e6, 2)}
    try:
        for route in routes:
            path = route["path"]
            gap, seconds = await _largest_gap(str(gateway.make_url(path)), "audio" in route)
            out[path] = {"largest_loop_gap_ms": gap, "request_s": seconds}
    finally:
        await gateway.close()
        await upstream.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=float, default=7.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.mb)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
