"""The thinnest honest aiohttp relay, for scripts/bench to measure llmgate against.

POST /v1/chat/completions and /chat/completions go to the upstream as they came (the body
as is, its Content-Type and Authorization); the upstream's answer comes back chunk by chunk
(iter_any) with its status and Content-Type. Nothing is parsed, checked or logged: what this
costs over the direct upstream is what any aiohttp relay costs, so "llmgate minus relay" is
what llmgate itself adds. uvloop when installed, as llmgate uses it by default
([server] uvloop = true); no access log, as llmgate has none.

    python scripts/bench_relay.py --upstream http://127.0.0.1:PORT/v1/chat/completions
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
FORWARDED = ("Content-Type", "Authorization")


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {k: request.headers[k] for k in FORWARDED if k in request.headers}
    session = request.app[SESSION]
    async with session.post(request.app[UPSTREAM], data=body, headers=headers) as upstream:
        content_type = upstream.headers.get("Content-Type", "application/octet-stream")
        response = web.StreamResponse(status=upstream.status, headers={
            "Content-Type": content_type
        })
        await response.prepare(request)
        async for data in upstream.content.iter_any():
            await response.write(data)
        await response.write_eof()
        return response


async def serve(host: str, port: int, upstream: str) -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", relay)
    app.router.add_post("/chat/completions", relay)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    # No cookie jar (a relay keeps none; llmgate's client has none either)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    ) as session:
        app[SESSION], app[UPSTREAM] = session, upstream
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=4096)
        await site.start()
        bound = runner.addresses[0][1]
        print(f"relay listening on {host}:{bound}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", required=True, help="the upstream's chat completions URL")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.host, args.port, args.upstream))


if __name__ == "__main__":
    main()
