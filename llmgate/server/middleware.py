"""Every error a caller sees, whatever raised it, leaves as an OpenAI error envelope; and
a compressed request body is refused before anything reads it."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web
from aiohttp.typedefs import Handler

from llmgate.errors import ApiError, caller_error, new_request_id
from llmgate.http import compressed

_MESSAGES = {
    404: "no such endpoint: {method} {path}",
    405: "{method} is not allowed on {path}",
    413: "request body is too large",
}


@web.middleware
async def error_envelopes(request: web.Request, handler: Handler) -> web.StreamResponse:
    if compressed(request.headers):
        # Agora never compresses; inflating a caller's body (before any key is checked)
        # would let a 1 MB body stall the loop for a second. Nothing of it is read.
        message = "a compressed request body is not accepted: send it without Content-Encoding"
        await _discard(request)
        return ApiError(415, message, headers={"Connection": "close"}).response()
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        template = _MESSAGES.get(exc.status, exc.reason)
        message = template.format(method=request.method, path=request.path)
        # no route, no method: no key was checked; the connection is not kept for more
        headers = {"Connection": "close"}
        if "Allow" in exc.headers:
            headers["Allow"] = exc.headers["Allow"]
        return ApiError(exc.status, message, headers=headers).response()
    except Exception as exc:  # (a turn's own errors were answered by its handler)
        where = f"on {request.method} {request.path}"
        return caller_error(exc, new_request_id(), where).response()


DISCARD_BYTES = 2**20  # of a refused body, read and dropped (never inflated) ...
DISCARD_S = 0.5  # ... for at most this long


async def _discard(request: web.Request) -> None:
    """What of a refused body is already coming is read and dropped, so that the connection
    closes cleanly: closed on unread bytes, it would end in a reset, which can make the
    caller lose the answer it was sent. Past the bounds, it is closed all the same."""
    content, left = request.content, DISCARD_BYTES
    with contextlib.suppress(Exception):  # (a caller gone meanwhile: nothing to keep)
        async with asyncio.timeout(DISCARD_S):
            while left > 0 and not content.at_eof():
                left -= len(await content.readany())

