"""Every error a caller sees, whatever raised it, leaves as an OpenAI error envelope; and
a compressed request body is refused before anything reads it."""

from __future__ import annotations

import logging
import os

from aiohttp import web
from aiohttp.typedefs import Handler

from llmgate.errors import ApiError
from llmgate.http import compressed

log = logging.getLogger("llmgate.server")

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
    except ApiError as exc:
        return exc.response()
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
    except Exception:
        # The class name only: an exception's text or traceback can hold internals.
        request_id = "req_" + os.urandom(12).hex()
        log.error("unhandled error on %s %s (request %s)", request.method, request.path,
                  request_id, exc_info=True)
        error = ApiError(500, "internal error in llmgate").for_request(request_id)
        return error.response(request_id)
