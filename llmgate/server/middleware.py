"""Every error a caller sees, whatever raised it, leaves as an OpenAI error envelope."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from llmgate.errors import ApiError

log = logging.getLogger("llmgate.server")

_MESSAGES = {
    404: "no such endpoint: {method} {path}",
    405: "{method} is not allowed on {path}",
    413: "request body is too large",
}


@web.middleware
async def error_envelopes(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        template = _MESSAGES.get(exc.status, exc.reason)
        message = template.format(method=request.method, path=request.path)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return ApiError(exc.status, message, headers=headers).response()
    except Exception:
        # The class name only: an exception's text or traceback can hold internals.
        log.error("unhandled error on %s %s", request.method, request.path, exc_info=True)
        return ApiError(500, "internal error in llmgate").response()
