"""The one upstream HTTP client: pooled connections, opened and closed with the app."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)


async def client_session(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: one ClientSession for every provider, for the app's lifetime."""
    connector = aiohttp.TCPConnector(
        limit=0,  # a voice box holds hundreds of concurrent streams; never queue a turn
        ttl_dns_cache=300,
        keepalive_timeout=30,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        # Cookies from a provider must never carry over from one caller's turn to another's
        # (and skipping the jar saves work on every request).
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None),
        skip_auto_headers=("User-Agent",),
        headers={"User-Agent": "llmgate"},
    )
    app[SESSION] = session
    yield
    await session.close()

