"""llmgate's own outbound HTTP: the calls it makes for itself, not a turn's provider stream
(HTTP tools, embeddings, the HTTP retriever, the speech endpoint, model lists, `check`).

Each of these calls carries configured credentials, so none follows a redirect: aiohttp
drops only Authorization on the way to another host, and an `api-key` header and the body
(the user's question) would go along. A 3xx is a failure like any other status. Every
answer is read to a bound, whatever its Content-Length says (a chunked one has none), and
none is inflated: llmgate asks for identity, and a compressed answer is a failure (a small
gzip would grow past any bound on the event loop).

Failures are one tree. A message is a predicate that its caller prefixes with whose
service it was ("tool weather " + "answered HTTP 500"); it never holds the URL (its query
may carry a key) nor the remote's own words, and never aiohttp's text (it quotes the URL).

    HttpError           a call that failed
     ├─ Unreachable     no connection: refused, DNS, TLS          "could not be reached"
     ├─ TimedOut        no answer, or no more of it, in time      "timed out"
     ├─ BrokenOff       the connection broke during the answer    "broke off its answer"
     ├─ TooLarge        the answer is longer than its bound       "answered more than 4 MB"
     ├─ Compressed      a Content-Encoding though identity asked  "sent a compressed answer"
     └─ StatusError     a status other than 2xx (3xx included)    "answered HTTP 503"
                        .status, .headers, .body (its first MAX_ERROR_BODY bytes)
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping

import aiohttp
from yarl import URL

from llmgate.config import PASSTHROUGH

MAX_ERROR_BODY = 64 * 1024  # of an error status's body: enough for a provider's message


def compressed(headers: Mapping[str, str]) -> bool:
    """Whether a message's body is encoded (gzip, br, ...): llmgate inflates none, neither
    a caller's request, a provider's answer nor any of its own calls' (a small gzip grows
    past any bound on the event loop)."""
    return headers.get("Content-Encoding", "identity").strip().lower() not in ("identity", "")


class HttpError(Exception):
    """A call that failed; `str()` is what happened, for the caller to say whose call."""


class Unreachable(HttpError):
    def __init__(self) -> None:
        super().__init__("could not be reached")


class TimedOut(HttpError):
    def __init__(self) -> None:
        super().__init__("timed out")


class BrokenOff(HttpError):
    def __init__(self) -> None:
        super().__init__("broke off its answer")


class TooLarge(HttpError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"answered more than {_size(limit)}")
        self.limit = limit


class Compressed(HttpError):
    def __init__(self) -> None:
        super().__init__("sent a compressed answer")


class StatusError(HttpError):
    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        super().__init__(f"answered HTTP {status}")
        self.status = status
        self.headers = headers
        self.body = body


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


def join(base_url: str | URL, path: str) -> URL:
    """`path` under a base URL; its query (Azure's ?api-version=...) stays on the end."""
    base = URL(base_url)
    return base.with_path(base.path.rstrip("/") + "/" + path.lstrip("/"), keep_query=True)


def bearer(api_key: str | None) -> dict[str, str]:
    """The Authorization header for a configured key; none for no key or `passthrough`
    (each caller's own key, which llmgate's own calls do not have)."""
    if not api_key or api_key == PASSTHROUGH:
        return {}
    return {"Authorization": f"Bearer {api_key}"}


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """aiohttp's and the OS's failures as HttpError, `from exc` kept for the traceback."""
    try:
        yield
    except HttpError:
        raise
    except TimeoutError as exc:  # aiohttp's ServerTimeoutError and its kin are TimeoutErrors
        raise TimedOut() from exc
    except aiohttp.ClientConnectorError as exc:  # DNS, refused, TLS
        raise Unreachable() from exc
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, ConnectionError) as exc:
        raise BrokenOff() from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise HttpError(f"failed ({type(exc).__name__})") from exc


@contextlib.asynccontextmanager
async def request(
    session: aiohttp.ClientSession,
    method: str,
    url: str | URL,
    *,
    headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout,
    data: bytes | None = None,
    params: Mapping[str, str] | None = None,
) -> AsyncIterator[aiohttp.ClientResponse]:
    """A 2xx response, its body for the caller to read (with `read`); failures inside the
    block are translated too. An answer not read to its end closes its connection."""
    with translated():
        async with session.request(
            method,
            url,
            headers={**headers, "Accept-Encoding": "identity"},
            data=data,
            params=params,
            timeout=timeout,
            allow_redirects=False,
            auto_decompress=False,
        ) as resp:
            try:
                if compressed(resp.headers):
                    raise Compressed()
                if not 200 <= resp.status < 300:
                    body = await read(resp, MAX_ERROR_BODY, cut=True)
                    raise StatusError(resp.status, resp.headers, body)
                yield resp
            finally:
                if not resp.content.at_eof():
                    resp.close()  # the rest is never read, nor waited for


async def read(resp: aiohttp.ClientResponse, limit: int, *, cut: bool = False) -> bytes:
    """At most `limit` bytes of the body. A longer one is TooLarge, or with `cut` its first
    `limit` bytes; either way no more than `limit + 1` bytes are read."""
    if not cut and (resp.content_length or 0) > limit:
        raise TooLarge(limit)
    parts: list[bytes] = []
    size = 0
    while size <= limit and (part := await resp.content.read(limit + 1 - size)):
        parts.append(part)
        size += len(part)
    if size > limit and not cut:
        raise TooLarge(limit)
    return b"".join(parts)[:limit]


async def fetch(
    session: aiohttp.ClientSession,
    method: str,
    url: str | URL,
    limit: int,
    *,
    headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout,
    data: bytes | None = None,
) -> bytes:
    """A whole 2xx body of at most `limit` bytes, or HttpError."""
    async with request(
        session, method, url, headers=headers, timeout=timeout, data=data
    ) as resp:
        return await read(resp, limit)


def _size(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:g} MB"
    return f"{n / 1024:g} KB"

