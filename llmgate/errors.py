"""Errors a caller may see, as OpenAI error envelopes.

    ApiError                     status + envelope; the only exception a handler answers with
     └─ UpstreamError            llmgate.upstream: something went wrong with a provider
         │                       (`fallback`: the provider's failure, another may serve)
         ├─ UpstreamStatus       the provider answered 4xx (kept) or 5xx (502)
         ├─ UpstreamUnavailable  refused / reset / malformed answer: 502
         ├─ UpstreamTimeout      no answer in time: 504
         └─ ProviderNotReady     the provider's ${VAR} is unset: 503

Messages say what to fix; 5xx messages say what failed and the request id, never internals.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from aiohttp import web

from llmgate.protocol import ErrorEnvelope, ErrorObject, encoder

log = logging.getLogger("llmgate.server")

# status -> (type, code) when the raiser does not say
_DEFAULTS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    499: ("invalid_request_error", "client_closed_request"),
    500: ("api_error", "internal_error"),
    502: ("api_error", "upstream_error"),
    503: ("api_error", "provider_unavailable"),
    504: ("api_error", "upstream_timeout"),
}


# What a turn's log line may say as its `error`: llmgate's own codes and types, and the
# codes and types OpenAI-compatible providers document. Anything else a provider sends is
# logged as `provider_error` (its text could be anything, a key or a forged line included).
LOGGED_ERRORS = frozenset(
    {c for pair in _DEFAULTS.values() for c in pair if c}
    | {
        "superseded", "shutdown", "server_error", "authentication_error", "permission_error",
        "not_found_error", "overloaded_error", "request_too_large", "insufficient_quota",
        "context_length_exceeded", "model_not_found", "content_filter", "content_policy_violation",
        "invalid_value", "invalid_type", "missing_required_parameter", "unknown_parameter",
        "unsupported_parameter", "unsupported_value", "string_above_max_length",
        "invalid_image", "invalid_image_url", "model_overloaded", "engine_overloaded",
        "tokens_exceeded", "quota_exceeded", "billing_hard_limit_reached", "timeout",
        "invalid_prompt", "tool_use_failed", "json_validate_failed", "model_decommissioned",
        "bad_request", "unprocessable_entity", "service_unavailable", "model_not_allowed",
    }
)
PROVIDER_ERROR = "provider_error"


def logged_error(code: str | None) -> str | None:
    """`code` if the log may carry it as it is, else `provider_error`."""
    return code if code is None or code in LOGGED_ERRORS else PROVIDER_ERROR


def default_type(status: int) -> tuple[str, str | None]:
    if status in _DEFAULTS:
        return _DEFAULTS[status]
    return ("invalid_request_error", None) if status < 500 else ("api_error", None)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        default_t, default_c = default_type(status)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or default_t
        self.code = code if code is not None else default_c
        self.headers = dict(headers or {})
        self.request_id: str | None = None

    def for_request(self, request_id: str) -> ApiError:
        """Name the request: in a 5xx message, so a caller's report can be found in the log,
        and in the response's X-Request-Id."""
        self.request_id = request_id
        if self.status >= 500 and request_id not in self.message:
            self.message = f"{self.message} (request {request_id})"
        return self

    def body(self) -> bytes:
        obj = ErrorObject(self.message, self.type, self.param, self.code)
        return encoder.encode(ErrorEnvelope(obj))

    def frame(self) -> bytes:
        """The error as an SSE `data:` frame, for failures after the stream began."""
        return b"data: " + self.body() + b"\n\n"

    def response(self) -> web.Response:
        """The error as the whole answer, before anything else was sent."""
        headers = dict(self.headers)
        if self.request_id:
            headers["X-Request-Id"] = self.request_id
        response = web.Response(
            status=self.status,
            body=self.body(),
            content_type="application/json",
            headers=headers,
        )
        if headers.get("Connection") == "close":
            response.force_close()
        return response


def new_request_id() -> str:
    return "req_" + os.urandom(12).hex()


def caller_error(exc: Exception, request_id: str, where: str) -> ApiError:
    """What the caller is told of `exc`, wherever it was caught (the handler, the
    middleware, the stream writer): an ApiError as it is, naming the request; anything
    else is llmgate's own bug: a 500, logged here with its traceback. Only the class name
    leaves: an exception's text or traceback can hold internals."""
    if isinstance(exc, ApiError):
        return exc.for_request(request_id)
    log.error("unhandled error %s (request %s)", where, request_id, exc_info=exc)
    return ApiError(500, "internal error in llmgate").for_request(request_id)


class UpstreamError(ApiError):
    # The provider's failure, not the caller's: another target may serve the turn, and
    # it counts against the provider's circuit.
    fallback = True


class UpstreamStatus(UpstreamError):
    """A provider's non-2xx answer: a 4xx is the caller's own mistake unless it is a 429
    or the provider turning down llmgate's credentials."""

    def __init__(self, status: int, message: str, *, fallback: bool = True, **kw) -> None:
        super().__init__(status, message, **kw)
        self.fallback = fallback


class UpstreamUnavailable(UpstreamError):
    def __init__(self, message: str) -> None:
        super().__init__(502, message)


class UpstreamTimeout(UpstreamError):
    def __init__(self, message: str) -> None:
        super().__init__(504, message)


class ProviderNotReady(UpstreamError):
    def __init__(self, message: str) -> None:
        super().__init__(503, message)
