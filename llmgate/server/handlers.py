"""HTTP handlers: chat completions (streamed or not), the model list, and health."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import msgspec
from aiohttp import web

from llmgate.errors import ApiError, UpstreamUnavailable
from llmgate.protocol import (
    ChatRequest,
    ChunkPeek,
    chunk_decoder,
    encoder,
    error_path,
    generic_decoder,
    request_decoder,
)
from llmgate.server.auth import KeyCheck
from llmgate.server.stream import stream_turn
from llmgate.turn import CHANNELS, CLIENT_CLOSED, Turn
from llmgate.upstream.client import SESSION
from llmgate.upstream.payload import build
from llmgate.upstream.provider import Provider, finish, read_bounded
from llmgate.upstream.router import ROUTER
from llmgate.upstream.watchdog import Watchdog

MAX_COMPLETION_BODY = 64 * 1024 * 1024
_ROLES = "system, developer, user, assistant or tool"


@dataclass(frozen=True)
class Settings:
    keys: KeyCheck
    max_body: int
    keepalive_s: float


SETTINGS = web.AppKey("settings", Settings)


class ChatCompletions:
    """POST <route>: one turn, from the caller's body to the provider's last byte."""

    def __init__(self, route: str) -> None:
        self.route = route

    async def handle(self, request: web.Request) -> web.StreamResponse:
        turn = Turn(self.route)
        try:
            return await self._turn(request, turn)
        except ApiError as exc:
            turn.failed(exc.status, exc.code or exc.type)
            return exc.for_request(turn.id).response(turn.id)
        except asyncio.CancelledError:
            turn.status = CLIENT_CLOSED
            raise
        except Exception:
            turn.status = 500  # the middleware answers it; the turn line must not say 200
            raise
        finally:
            turn.log()

    async def _turn(self, request: web.Request, turn: Turn) -> web.StreamResponse:
        settings = request.app[SETTINGS]
        caller_key = settings.keys(request)
        body = await _read_body(request, settings.max_body)
        chat = _decode(body)
        provider, model = request.app[ROUTER].resolve(chat.model)
        turn.model, turn.provider, turn.stream = model, provider.name, bool(chat.stream)
        upstream_body, turn.metadata = build(generic_decoder.decode(body), model, provider.forward)
        session = request.app[SESSION]
        channels = request.app[CHANNELS]
        channel = channels.enter(turn)
        try:
            if chat.stream:
                return await stream_turn(
                    request,
                    turn,
                    settings.keepalive_s,
                    session,
                    provider,
                    upstream_body,
                    caller_key,
                )
            return await _complete(turn, session, provider, upstream_body, caller_key)
        finally:
            channels.leave(channel, turn)


async def _complete(
    turn: Turn,
    session: aiohttp.ClientSession,
    provider: Provider,
    body: bytes,
    caller_key: str | None,
) -> web.Response:
    first = provider.config.first_token_timeout_s
    idle = provider.config.idle_timeout_s
    with Watchdog(first, f"provider '{provider.name}' did not answer within {first:g}s") as wd:
        upstream = await provider.send(session, body, False, caller_key)
        wd.rearm(idle, f"provider '{provider.name}' went silent for {idle:g}s")
        clean = False
        try:
            with provider.translate():
                raw = await read_bounded(upstream, MAX_COMPLETION_BODY, wd.progress)
            clean = upstream.content.at_eof()
        finally:
            finish(upstream, clean)
    if not clean:
        raise UpstreamUnavailable(f"provider '{provider.name}' sent an oversized answer")
    turn.mark_first_token()
    peek = _peek_completion(provider, raw)
    if peek.error is not None:
        raise provider.answer_error(raw) or UpstreamUnavailable(
            f"provider '{provider.name}' answered with an error"
        )
    turn.usage = peek.usage
    turn.finish_reason = next((c.finish_reason for c in peek.choices if c.finish_reason), None)
    return web.Response(
        body=raw, content_type="application/json", headers={"X-Request-Id": turn.id}
    )


def _peek_completion(provider: Provider, raw: bytes) -> ChunkPeek:
    try:
        return chunk_decoder.decode(raw)
    except msgspec.DecodeError:
        raise UpstreamUnavailable(f"provider '{provider.name}' sent a malformed answer") from None


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than {limit / 2**20:g} MB (server.max_body_mb)")


def _decode(body: bytes) -> ChatRequest:
    try:
        return request_decoder.decode(body)
    except msgspec.ValidationError as exc:
        what, path = error_path(exc)
        if path.endswith(".role") and what.startswith("Invalid value"):
            what += f"; expected {_ROLES}"
        raise ApiError(400, f"{path}: {what}", param=path) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON ({exc})") from None


async def list_models(request: web.Request) -> web.Response:
    request.app[SETTINGS].keys(request)
    now = int(time.time())
    data = [
        {"id": model, "object": "model", "created": now, "owned_by": owner}
        for model, owner in request.app[ROUTER].models()
    ]
    return web.json_response(
        {"object": "list", "data": data}, dumps=lambda o: encoder.encode(o).decode()
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
