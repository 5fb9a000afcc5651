"""One OpenAI-compatible provider: its URL, its credentials, and how its failures read."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping

import aiohttp
import msgspec
from yarl import URL

from llmgate.config import PASSTHROUGH, ProviderConfig
from llmgate.errors import (
    ProviderNotReady,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from llmgate.protocol import OPENAI_PARAMS, UpstreamErrorBody

_KEYLIKE = re.compile(r"(sk-|Bearer\s+|gsk_|AIza)[A-Za-z0-9_\-*.]{4,}", re.IGNORECASE)
_SECRET_HEADER = re.compile(r"key|token|auth|secret|signature", re.IGNORECASE)
MAX_FIELD = 200  # characters of a provider's `param`, `type` or `code` passed on
_KEPT_HEADERS = ("Retry-After", "Retry-After-Ms")
_error_decoder = msgspec.json.Decoder(UpstreamErrorBody)


class Provider:
    def __init__(self, name: str, config: ProviderConfig, unset_env: tuple[str, ...] = ()):
        self.name = name
        self.config = config
        self.unset_env = unset_env
        base = URL(config.base_url)  # a query (Azure's ?api-version=...) stays on the end
        self.url = base.with_path(base.path.rstrip("/") + "/chat/completions", keep_query=True)
        self.models_url = base.with_path(base.path.rstrip("/") + "/models", keep_query=True)
        self.forward = OPENAI_PARAMS | frozenset(config.forward_fields)
        self.passthrough = config.api_key == PASSTHROUGH
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout_s, connect=config.connect_timeout_s
        )
        headers = {"Content-Type": "application/json", **config.headers}
        if config.api_key and not self.passthrough:
            headers["Authorization"] = f"Bearer {config.api_key}"
        headers["Accept-Encoding"] = "identity"  # an answer is never inflated (upstream/call)
        self._headers = {
            True: {**headers, "Accept": "text/event-stream"},
            False: {**headers, "Accept": "application/json"},
        }
        # What a provider might echo back: its key, and any header of ours that holds one
        # (Azure's `api-key`, Anthropic's `x-api-key`), matched whatever their case.
        secrets = [v for h, v in config.headers.items() if _SECRET_HEADER.search(h)]
        if config.api_key and not self.passthrough:
            secrets.append(config.api_key)
        secrets = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)
        self._secrets = (
            re.compile("|".join(map(re.escape, secrets)), re.IGNORECASE) if secrets else None
        )

    def check_ready(self) -> None:
        if self.unset_env:
            names = ", ".join(self.unset_env)
            raise ProviderNotReady(
                f"provider '{self.name}' is not configured: environment variable {names} is not set"
            )

    def headers(self, stream: bool, caller_key: str | None) -> dict[str, str]:
        headers = self._headers[stream]
        if self.passthrough and caller_key:
            headers = {**headers, "Authorization": f"Bearer {caller_key}"}
        return headers

    def error_for(self, exc: BaseException) -> UpstreamError:
        """Our error for aiohttp's or the OS's, without its text (it can hold internals)."""
        if isinstance(exc, UpstreamError):
            return exc
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return UpstreamTimeout(f"provider '{self.name}' did not accept a connection in time")
        if isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError):
            return UpstreamTimeout(f"provider '{self.name}' did not answer in time")
        if isinstance(exc, aiohttp.ClientConnectorError):
            return UpstreamUnavailable(f"could not connect to provider '{self.name}'")
        if isinstance(
            exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError | ConnectionError
        ):
            return UpstreamUnavailable(f"provider '{self.name}' broke off its answer")
        return UpstreamUnavailable(
            f"the connection to provider '{self.name}' failed ({type(exc).__name__})"
        )

    def status_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> UpstreamStatus:
        """The caller's error for a non-2xx answer whose body (bounded) is `raw`."""
        kept = {h: headers[h] for h in _KEPT_HEADERS if h in headers}
        detail = error_detail(raw)
        if status in (401, 403) and not self.passthrough:
            # Our key, not the caller's: say who can fix it, and repeat nothing of the key.
            message = (
                f"provider '{self.name}' rejected llmgate's credentials; "
                f"check providers.{self.name}.api_key"
            )
            return UpstreamStatus(status, message, headers=kept)
        if 400 <= status < 500:
            message = self.redact(str(detail.get("message") or f"HTTP {status}"))
            return UpstreamStatus(
                status,
                f"provider '{self.name}': {message}",
                fallback=status == 429,
                param=self._field(detail.get("param")),
                type=self._field(detail.get("type")),
                code=self._field(detail.get("code")),
                headers=kept,
            )
        return UpstreamStatus(
            502, f"provider '{self.name}' failed with HTTP {status}", headers=kept
        )

    def answer_error(self, raw: bytes) -> UpstreamStatus | None:
        """A 2xx answer that is an error envelope (or the JSON a stream request got)."""
        message = error_detail(raw).get("message")
        if not message:
            return None
        return UpstreamStatus(502, f"provider '{self.name}': {self.redact(str(message))}")

    def frame_error(self, payload: bytes) -> UpstreamError:
        """A `{"error": ...}` the provider sent inside its stream. Every path says it the
        same way: llmgate's envelope (502, `upstream_error`, the request id added by the
        writer) with the provider's message, redacted; never the provider's frame as sent."""
        return self.answer_error(payload) or UpstreamUnavailable(
            f"provider '{self.name}' sent an error frame"
        )

    def redact(self, text: str) -> str:
        """`text` without this provider's secrets or anything shaped like a key."""
        if self._secrets is not None:
            text = self._secrets.sub("[redacted]", text)
        return _KEYLIKE.sub("[redacted]", text)[:2000]

    def _field(self, value: object) -> str | None:
        text = _str_or_none(value)
        return None if text is None else self.redact(text)[:MAX_FIELD]


def error_detail(raw: bytes) -> dict:
    try:
        body = _error_decoder.decode(raw)
    except msgspec.DecodeError:
        return {}
    if isinstance(body.error, dict):
        return body.error
    if isinstance(body.error, str):
        return {"message": body.error}
    return {"message": body.message} if body.message else {}


def _str_or_none(value: object) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)
