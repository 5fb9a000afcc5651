"""The HTTP calls a knowledge base makes: an embeddings endpoint, a retrieval service.

One way to POST JSON and read a bounded answer, with every failure said without the URL
(it can carry a key in its query) and without the service's own text.
"""

from __future__ import annotations

import aiohttp
from yarl import URL


class ServiceError(Exception):
    """What went wrong, in words a caller can prefix with whose service it was."""


def new_session() -> aiohttp.ClientSession:
    """No cookie from one caller's answer may reach another's request."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())


async def post_json(
    session: aiohttp.ClientSession,
    url: str | URL,
    body: bytes,
    headers: dict[str, str],
    timeout: aiohttp.ClientTimeout,
    limit: int,
) -> bytes:
    try:
        async with session.post(url, data=body, headers=headers, timeout=timeout) as resp:
            if resp.status != 200:
                raise ServiceError(f"answered HTTP {resp.status}")
            if (resp.content_length or 0) > limit:
                raise ServiceError(f"answered more than {limit // 2**20} MB")
            return await resp.read()
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise ServiceError(f"failed ({type(exc).__name__})") from None
