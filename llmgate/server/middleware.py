"""Every error a caller sees, whatever raised it, leaves as an OpenAI error envelope; and
a compressed request body is refused before anything reads it."""

from __future__ import annotations

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
