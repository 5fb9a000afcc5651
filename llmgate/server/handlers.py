"""HTTP handlers: chat completions (streamed or not), the model list, and health."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
from aiohttp import web

from llmgate.agora import cache_key, own_phrases_out
from llmgate.calls import CALLS
from llmgate.config import is_loopback
from llmgate.errors import ApiError, UpstreamTimeout, caller_error
from llmgate.obs import clock, metrics, tracing
from llmgate.pipeline import Ask, Call
from llmgate.protocol import ChatRequest, encoder, error_path, generic_decoder, request_decoder
from llmgate.server.auth import Caller, Key, KeyCheck, Rule
from llmgate.server.collect import collect
from llmgate.server.feed import FEED
from llmgate.server.limits import LimitState
from llmgate.server.serve import SHUTDOWN
from llmgate.server.stream import Staged, require_finish, shutting_down, stream_answer
from llmgate.state import STATE
from llmgate.turn import CLIENT_CLOSED, Turn
from llmgate.upstream.call import UpstreamCall
from llmgate.upstream.client import SESSION
from llmgate.upstream.failover import complete, provider_call
from llmgate.upstream.payload import build
from llmgate.upstream.router import Router
from llmgate.upstream.targets import Plan

log = logging.getLogger("llmgate.server")
BODY_TOTAL_GAPS = 10  # a body's whole read may take this many read_timeout_s
_ROLES = "system, developer, user, assistant or tool"


@dataclass(frozen=True)
class Settings:
    keys: KeyCheck
    limits: LimitState
    max_body: int
    keepalive_s: float
    apology: str | None = None  # server.on_stream_error = "apology": what is said
    read_timeout_s: float = 30.0
    metrics: metrics.Names | None = None  # None: metrics off
    answer_timeout_s: float = 300.0  # a non-streamed answer, whole
    playground: bool = False  # [playground] enabled: the clock may carry turn.detail


class ChatCompletions:
    """POST <route>: one turn, from the caller's body to the provider's last byte.

    `call` is the route's composed Call when it has stages; without, the route relays.
    Settings and router are those of the config it was built from (a reload builds anew).
    """

    def __init__(
        self,
        route: str,
        call: Call | None,
        settings: Settings,
        router: Router,
        phrases: tuple[str, ...] = (),
    ) -> None:
        self.route = route
        self.call = call
        # what llmgate itself says on this route, taken out of the history's assistant
        # messages (agora.own_phrases_out); none on a plain route without an apology
        self.phrases = phrases
        self.settings = settings
        self.router = router

    async def handle(self, request: web.Request) -> web.StreamResponse:
        # A span per turn with [otel] on (continuing the caller's traceparent); else free.
        with tracing.turn_span(request.headers, route=self.route) as span:
            turn = Turn(self.route, request.headers.get("X-Request-Id"))
            if request.headers.get("X-Llmgate-Timing") == "1":
                turn.timing = True
                if self.settings.playground:
                    turn.detail = {}
            try:
                return await self._measured(request, turn)
            finally:
                if span is not None:
                    _outcome(span, turn)

    async def _measured(self, request: web.Request, turn: Turn) -> web.StreamResponse:
        names = self.settings.metrics
        if names is None:
            return await self._counted(request, turn)
        metrics.ACTIVE.inc()
        try:
            return await self._counted(request, turn)
        finally:
            metrics.ACTIVE.dec()
            metrics.observe(turn, names)

    async def _counted(self, request: web.Request, turn: Turn) -> web.StreamResponse:
        try:
            return await self._turn(request, turn)
        except asyncio.CancelledError as exc:
            if exc.args != (SHUTDOWN,):
                turn.end(CLIENT_CLOSED)
                raise
            # Cut by the drain before its answer began: a 503 the caller can act on.
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            return self._failed(turn, shutting_down())
        except Exception as exc:
            return self._failed(turn, exc)
        finally:
            turn.log()
            request.app[CALLS].add(turn)
            request.app[FEED].publish(turn)

    @staticmethod
    def _failed(turn: Turn, exc: Exception) -> web.Response:
        """Before the answer began: the error is the whole answer."""
        error = caller_error(exc, turn.id, f"in turn {turn.id}")
        turn.end(error.status, error.code or error.type)
        return error.response()

    async def _turn(self, request: web.Request, turn: Turn) -> web.StreamResponse:
        settings = self.settings
        caller = settings.keys(request)
        turn.key = caller.name
        slot = await settings.limits.admit(caller)  # a 429 here, before any upstream work
        try:
            return await self._admitted(request, turn, settings, caller)
        finally:
            await settings.limits.release(slot)

    async def _admitted(
        self, request: web.Request, turn: Turn, settings: Settings, caller: Caller
    ) -> web.StreamResponse:
        body = await _read_body(request, settings.max_body, settings.read_timeout_s)
        try:
            chat, raw = _decode(body)
        except ApiError:
            turn.stream = _asked_to_stream(body)  # the log line says what was asked
            raise
        turn.admitted = turn.elapsed()
        plan = self.router.resolve(chat.model)
        target = plan.first
        turn.model, turn.provider = target.model, target.provider.name
        if caller.allowed is not None and not caller.may_use(*_model_id(plan)):
            message = f"model '{chat.model}' is not one this key may use"
            raise ApiError(403, message, param="$.model", code="model_not_allowed")
        caller_key = caller.key
        turn.stream = bool(chat.stream)
        upstream_body, turn.metadata = build(raw, target.model, plan.forward)
        if self.phrases:
            own_phrases_out(upstream_body["messages"], self.phrases)
        if plan.cache_by_channel and "prompt_cache_key" not in upstream_body:
            key = cache_key(turn.metadata)
            if key is not None:
                upstream_body["prompt_cache_key"] = key
        session = request.app[SESSION]
        channels = request.app[STATE].channels
        channel = await channels.enter(turn)
        apology = settings.apology if chat.stream else None
        try:
            # A plain route relays one target's bytes; several targets (an alias) are read
            # chunk by chunk, so that the turn can move before the first one.
            call = self.call or (provider_call if len(plan.targets) > 1 else None)
            turn.staged = self.call is not None
            if call is not None:
                ask = Ask(upstream_body, turn, plan, session, caller_key, turn.stream, apology)
                if chat.stream:
                    source = Staged(call(ask))
                    return await stream_answer(
                        request, turn, settings.keepalive_s, source, apology
                    )
                async with _deadline(settings.answer_timeout_s):
                    return await _collected(turn, call, ask)
            if chat.stream:
                upstream = UpstreamCall(
                    session,
                    target.provider,
                    encoder.encode(upstream_body),
                    caller_key,
                    turn,
                )
                with tracing.span(
                    "upstream.attempt", provider=target.provider.name, model=target.model
                ):
                    return await stream_answer(
                        request, turn, settings.keepalive_s, upstream, apology
                    )
            async with _deadline(settings.answer_timeout_s):
                answer = await complete(
                    Ask(upstream_body, turn, plan, session, caller_key, False)
                )
            turn.mark_first_token()
            return _json(turn, answer)
        finally:
            await channels.leave(channel, turn)


@contextlib.asynccontextmanager
async def _deadline(seconds: float) -> AsyncIterator[None]:
    """A non-streamed answer is whole within `seconds`, or the caller gets a 504: a provider
    that trickles bytes must not hold a caller waiting for a status."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        message = f"the answer was not whole within {seconds:g}s (server.answer_timeout_s)"
        raise UpstreamTimeout(message) from None


def _model_id(plan: Plan) -> tuple[str, bool]:
    """What `allowed_models` names: an alias, or `provider/model`."""
    if plan.alias:
        return plan.name, True
    target = plan.first
    return f"{target.provider.name}/{target.model}", False


def _outcome(span, turn: Turn) -> None:
    """A turn's span gets what its log line says of it (never text, never a key)."""
    tracing.set_attrs(
        span, model=turn.model, provider=turn.provider, request_id=turn.id,
        status=turn.status, chunks=turn.chunks, key=turn.key,
    )
    if turn.status >= 400:
        tracing.fail(span, turn.status, turn.error)


async def _collected(turn: Turn, call: Call, ask: Ask) -> web.Response:
    completion = await collect(call, ask)
    require_finish(completion.finish_reason, turn.provider)
    turn.mark_first_token()
    return _json(turn, completion.encode())


def _json(turn: Turn, raw: bytes) -> web.Response:
    headers = {"X-Request-Id": turn.id}
    if turn.timing:  # the turn's clock, asked for
        headers["Server-Timing"] = clock.server_timing(turn)
    return web.Response(body=raw, content_type="application/json", headers=headers)


async def _read_body(request: web.Request, limit: int, gap_s: float) -> bytes:
    """The body, read as it comes: each piece must follow the last within `gap_s` (a slow
    but steady link may take its time), the whole within BODY_TOTAL_GAPS gaps, and at most
    `limit` bytes (this generation's: a reload applies server.max_body_mb at once)."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    content = request.content
    parts: list[bytes] = []
    size = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + gap_s * BODY_TOTAL_GAPS
    try:
        while not content.at_eof():
            async with asyncio.timeout(min(gap_s, deadline - loop.time())):
                data = await content.readany()
            size += len(data)
            if size > limit:  # (chunked: no Content-Length to refuse it by)
                raise _too_large(limit)
            parts.append(data)
    except TimeoutError:
        message = (
            f"the request body stalled for {gap_s:g}s, or took over {gap_s * BODY_TOTAL_GAPS:g}s"
            " in all (server.read_timeout_s)"
        )
        # the rest of the body would be read as the next request: the connection ends here
        raise ApiError(408, message, headers={"Connection": "close"}) from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _too_large(limit: int) -> ApiError:
    message = f"request body is larger than {limit / 2**20:g} MB (server.max_body_mb)"
    return ApiError(413, message, headers={"Connection": "close"})  # the rest is unread


class _StreamPeek(msgspec.Struct):
    stream: object = None


_stream_peek = msgspec.json.Decoder(_StreamPeek)


def _asked_to_stream(body: bytes) -> bool:
    try:
        return _stream_peek.decode(body).stream is True
    except (msgspec.DecodeError, RecursionError):
        return False


def _decode(body: bytes) -> tuple[ChatRequest, dict]:
    """The request, checked, and the body as sent (what goes upstream, less our fields)."""
    try:
        return request_decoder.decode(body), generic_decoder.decode(body)
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    except msgspec.ValidationError as exc:
        what, path = error_path(exc)
        if path.endswith(".role") and what.startswith("Invalid value"):
            what += f"; expected {_ROLES}"
        raise ApiError(400, f"{path}: {what}", param=path) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON ({exc})") from None


class ModelList:
    """GET /v1/models: aliases, then each provider's models (a key is needed, as at OpenAI)."""

    def __init__(self, settings: Settings, router: Router) -> None:
        self.settings = settings
        self.router = router

    async def handle(self, request: web.Request) -> web.Response:
        caller = self.settings.keys(request)
        now = int(time.time())
        data = [
            {"id": model, "object": "model", "created": now, "owned_by": owner}
            for model, owner in self.router.models()
            if caller.may_use(model, owner == "llmgate")
        ]
        return web.json_response(
            {"object": "list", "data": data}, dumps=lambda o: encoder.encode(o).decode()
        )


class MetricsPage:
    """GET /metrics: Prometheus' text format, for `server.metrics_key` or loopback only."""

    def __init__(self, key: str | None) -> None:
        self.key = KeyCheck([Key(key, "metrics", Rule(1, 1))], Rule(1, 1)) if key else None

    async def handle(self, request: web.Request) -> web.Response:
        if self.key is not None:
            self.key(request)
        elif not is_loopback(request.remote or "") or _proxied(request):
            message = "/metrics is served to loopback callers only; set server.metrics_key"
            raise ApiError(403, message)
        body = await asyncio.to_thread(metrics.render) if metrics.MULTIPROCESS else metrics.render()
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


def _proxied(request: web.Request) -> bool:
    """Came through a proxy on this host: from loopback, but not a loopback caller's."""
    return any(h in request.headers for h in ("Forwarded", "X-Forwarded-For", "X-Real-IP"))


async def healthz(request: web.Request) -> web.Response:
    shared = request.app[STATE].shared
    if shared is None:
        return web.json_response({"status": "ok"})
    # still 200 when local: a voice call does not fail because Redis did
    return web.json_response({"status": "ok", "state": "shared" if shared else "local"})
