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


class OwnSession:
    """A client of one's own (a tool's, a speech endpoint's, a knowledge base's), opened on
    first use inside the running loop and closed with its owner."""

    __slots__ = ("_session",)

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def get(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = new_session()
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


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
