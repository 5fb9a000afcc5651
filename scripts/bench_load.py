"""Load driver for scripts/bench: streams chat completions and times each one.

Run by the harness in its own process; prints one JSON object with per-request times (ms):
`ttft` (request sent -> first content token), `total` (-> [DONE]), and failures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time

import aiohttp

_TOKEN = re.compile(rb'"content":"[^"]')
BODY = '{{"model":"{model}","stream":true,"messages":[{{"role":"user","content":{content}}}]}}'


async def one(
    session: aiohttp.ClientSession, url: str, model: str, hang_up: bool, question: str = "hi"
) -> dict:
    started = time.monotonic()
    first = None
    body = BODY.format(model=model, content=json.dumps(question))
    try:
        async with session.post(url, data=body) as resp:
            if resp.status != 200:
                return {"error": f"HTTP {resp.status}"}
            async for data in resp.content.iter_any():
                if first is None and _TOKEN.search(data):
                    first = time.monotonic()
                    if hang_up:
                        resp.close()
                        return {"ttft": (first - started) * 1000, "closed_at": first}
                if b"data: [DONE]" in data:
                    break
                if b'"error"' in data:
                    return {"error": "error frame"}
            else:
                return {"error": "stream ended without [DONE]"}
    except aiohttp.ClientError as exc:
        return {"error": type(exc).__name__}
    now = time.monotonic()
    if first is None:
        return {"error": "no content token"}
    return {"ttft": (first - started) * 1000, "total": (now - started) * 1000}


async def run(args: argparse.Namespace) -> dict:
    connector = aiohttp.TCPConnector(limit=0, force_close=args.hang_up)
    headers = {"Authorization": "Bearer bench", "Content-Type": "application/json"}
    results: list[dict] = []
    counter = iter(range(args.requests))
    questions = ["hi"]
    if args.questions:
        with open(args.questions) as f:
            questions = [line.strip() for line in f if line.strip()]

    async def worker(k: int) -> None:
        # Calls do not start in lockstep: spread the workers' first requests over stagger_ms.
        await asyncio.sleep(args.stagger_ms * k / args.concurrency / 1000)
        for i in counter:
            tag = f"-{args.tag}{i}" if args.hang_up else ""
            model = f"{args.model_prefix}mock-{args.chunks}-{args.first_ms}-{args.gap_ms}{tag}"
            question = questions[i % len(questions)]
            result = await one(session, args.url, model, args.hang_up, question)
            if args.hang_up:
                result["tag"] = f"{args.tag}{i}"
            results.append(result)

    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        for _ in range(args.warmup):  # open the pool's connections before timing
            model = f"{args.model_prefix}mock-{args.chunks}-0-0"
            warm = [one(session, args.url, model, False) for _ in range(args.concurrency)]
            await asyncio.gather(*warm)
        started = time.monotonic()
        await asyncio.gather(*(worker(k) for k in range(args.concurrency)))
        elapsed = time.monotonic() - started
    return {
        "elapsed_s": elapsed,
        "results": results,
        "warmup_requests": args.warmup * args.concurrency,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--first-ms", type=int, default=0)
    parser.add_argument("--gap-ms", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=0, help="untimed rounds, all workers")
    parser.add_argument("--stagger-ms", type=int, default=0, help="spread worker starts")
    parser.add_argument("--hang-up", action="store_true", help="close after the first token")
    parser.add_argument("--tag", default="r", help="prefix of the request tags the mock logs")
    parser.add_argument("--model-prefix", default="", help="e.g. an alias's (bench config)")
    parser.add_argument("--questions", help="a file of user messages, one a line, in turn")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    json.dump(asyncio.run(run(args)), sys.stdout)


if __name__ == "__main__":
    main()
