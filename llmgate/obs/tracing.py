"""OpenTelemetry traces of a turn, exported over OTLP/HTTP; off by default and free when off.

Off (no [otel] section, or ``setup(None)``): every function here tests one module flag
first and returns; ``span()`` and ``turn_span()`` return one shared ``nullcontext`` that
yields None, and opentelemetry is never imported. On: ``setup()`` imports the SDK and
keeps a TracerProvider of this module's own (the global one is left alone), whose
BatchSpanProcessor exports from a thread of its own; a span costs the loop a few
microseconds to start and end, and export never happens on the loop.

Spans (the handle a ``with`` yields is the span, or None when off):

``chat.completions`` (SERVER)
    One turn, from the request to the stream's end. Continues an incoming W3C
    ``traceparent``/``tracestate``; without one it is a root, sampled at
    ``[otel] sample_ratio`` (an incoming parent's own decision is always followed).
    Attributes: ``http.route``, ``gen_ai.request.model``, ``http.response.status_code``,
    ``error.type``.
``upstream.attempt`` (CLIENT)
    One request to one provider: ``gen_ai.system`` (the provider's name),
    ``server.address``, ``gen_ai.request.model``, ``llmgate.outcome``.
``rag.retrieve`` (INTERNAL)
    One retrieval from a knowledge base.
``tool.call`` (INTERNAL)
    One tool call: ``gen_ai.tool.name``, ``llmgate.outcome``.
``tts.synthesize`` (INTERNAL)
    One piece of speech: ``llmgate.engine``, ``llmgate.characters``.

Attributes are given as keywords. These short names stand for semantic conventions:
route ``http.route``, method ``http.request.method``, status ``http.response.status_code``,
model ``gen_ai.request.model``, response_model ``gen_ai.response.model``, provider
``gen_ai.system``, server_address ``server.address``, server_port ``server.port``, tool
``gen_ai.tool.name``, input_tokens/output_tokens ``gen_ai.usage.*``, error_type
``error.type``. Any other name ``x`` becomes ``llmgate.x``; a name with a dot in it
(``**{"a.b": v}``) is kept as it is. Values are str, int, float or bool; None and any
other type are left out. Never pass message text, prompts, keys or request bodies.

An exception leaving a span sets status ERROR and ``error.type`` to the exception's class
name, and adds an ``exception`` event with ``exception.type`` only: an exception's text and
traceback can hold user text, and are never recorded. ``asyncio.CancelledError`` (the
caller hung up) and ``GeneratorExit`` (a stream closed early) are not errors: they set
``llmgate.cancelled = true``, leave the status UNSET and propagate as ever.

A span is current while its ``with`` block runs, in the context of the task that opened
it: spans and asyncio tasks started inside are its children (a task copies the context
when it is created). Enter and leave a span in the same task; an async generator's
``with`` that is left from another task (e.g. at garbage collection) cannot restore the
context and OpenTelemetry logs an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmgate.config import OtelConfig

__all__ = [
    "current_trace_id",
    "fail",
    "set_attrs",
    "setup",
    "shutdown",
    "span",
    "turn_span",
]

SHUTDOWN_S = 5.0  # shutdown() waits this long at most for the last export
_on = False  # checked first by every function here
_NULL = contextlib.nullcontext()  # what span() and turn_span() return when off
_provider: Any = None
_tracer: Any = None
# opentelemetry's callables, bound by setup() (never imported when off)
_attach: Any = None
_detach: Any = None
_with_span: Any = None
_current_span: Any = None
_extract: Any = None
_empty_context: Any = None
_ERROR: Any = None
_SERVER: Any = None
_CLIENT: Any = None
_INTERNAL: Any = None

_VALUE_TYPES = (str, bool, int, float)
_CANCELLED = (asyncio.CancelledError, GeneratorExit)
# keyword -> attribute name; filled in with llmgate.<name> as new names are used
_NAMES: dict[str, str] = {
    "route": "http.route",
    "method": "http.request.method",
    "status": "http.response.status_code",
    "model": "gen_ai.request.model",
    "response_model": "gen_ai.response.model",
    "provider": "gen_ai.system",
    "server_address": "server.address",
    "server_port": "server.port",
    "tool": "gen_ai.tool.name",
    "input_tokens": "gen_ai.usage.input_tokens",
    "output_tokens": "gen_ai.usage.output_tokens",
    "error_type": "error.type",
}


def setup(config: OtelConfig | None) -> None:
    """Turn tracing on with ``config``, or off with None; an earlier provider is shut down.

    Call it at startup, off the hot path: shutting an earlier provider down exports what
    it still holds, synchronously.
    """
    global _on, _provider, _tracer, _attach, _detach, _with_span, _current_span
    global _extract, _empty_context, _ERROR, _SERVER, _CLIENT, _INTERNAL
    shutdown()
    if config is None:
        return

    from opentelemetry import context, trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        resource=Resource.create({"service.name": config.service_name}),
    )
    exporter = OTLPSpanExporter(endpoint=config.endpoint, headers=dict(config.headers))
    provider.add_span_processor(BatchSpanProcessor(exporter))

    _attach, _detach = context.attach, context.detach
    _with_span, _current_span = trace.set_span_in_context, trace.get_current_span
    _extract = TraceContextTextMapPropagator().extract
    _empty_context = context.Context()
    _ERROR = trace.Status(trace.StatusCode.ERROR)
    _SERVER, _CLIENT, _INTERNAL = (
        trace.SpanKind.SERVER,
        trace.SpanKind.CLIENT,
        trace.SpanKind.INTERNAL,
    )
    _tracer = provider.get_tracer("llmgate")
    _provider = provider
    _on = True


def shutdown() -> None:
    """Turn tracing off, export the spans still held, and shut the provider down.

    It blocks until that is done, or for SHUTDOWN_S at most (a collector that is down
    would hold it up for the exporter's timeout and retries); the rest goes on in a daemon
    thread. Call it at app cleanup, in a thread (asyncio.to_thread) if a collector could
    be served by this same loop.
    """
    global _on, _provider, _tracer
    provider = _provider
    _on, _provider, _tracer = False, None, None
    if provider is not None:
        closing = threading.Thread(target=provider.shutdown, name="llmgate-otel-shutdown")
        closing.daemon = True
        closing.start()
        closing.join(SHUTDOWN_S)


def turn_span(headers: Mapping[str, str], name: str = "chat.completions", **attrs: Any) -> Any:
    """One turn's root span (SERVER), continuing the request's ``traceparent`` if any.

    ``headers`` is looked up by lower-case name (aiohttp's request.headers is
    case-insensitive). A context manager; yields the span, or None when off.
    """
    if not _on:
        return _NULL
    if headers.get("traceparent") is None:
        parent = _empty_context  # a root: not a child of whatever span is current
    else:
        parent = _extract(carrier=headers, context=_empty_context)
    return _Span(name, _SERVER, _clean(attrs) if attrs else None, parent)


def span(name: str, **attrs: Any) -> Any:
    """A child span of the current one (CLIENT for ``upstream*`` names, else INTERNAL).

    A context manager; yields the span, or None when off.
    """
    if not _on:
        return _NULL
    kind = _CLIENT if name.startswith("upstream") else _INTERNAL
    return _Span(name, kind, _clean(attrs) if attrs else None, None)


def set_attrs(handle: Any, **attrs: Any) -> None:
    """Set attributes on a span handle (None: nothing)."""
    if handle is None or not attrs or not handle.is_recording():
        return
    handle.set_attributes(_clean(attrs))


def fail(handle: Any, status: int, code: str | None) -> None:
    """Mark a span failed with an HTTP status and an error code (None: the status)."""
    if handle is None or not handle.is_recording():
        return
    handle.set_attributes({"http.response.status_code": status, "error.type": code or str(status)})
    handle.set_status(_ERROR)


def current_trace_id() -> str | None:
    """The current span's trace id as 32 hex digits, or None (off, or no span)."""
    if not _on:
        return None
    ctx = _current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def _clean(attrs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in attrs.items():
        if value is None or not isinstance(value, _VALUE_TYPES):
            continue
        name = _NAMES.get(key)
        if name is None:
            name = _NAMES[key] = key if "." in key else "llmgate." + key
        out[name] = value
    return out


def _error_type(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


class _Span:
    """Starts a span on entry and makes it current; ends it and restores the context on exit."""

    __slots__ = ("_attrs", "_kind", "_name", "_parent", "_span", "_token")

    def __init__(self, name: str, kind: Any, attrs: dict[str, Any] | None, parent: Any) -> None:
        self._name = name
        self._kind = kind
        self._attrs = attrs
        self._parent = parent  # None: the current context

    def __enter__(self) -> Any:
        parent = self._parent
        span = _tracer.start_span(
            self._name,
            context=parent,
            kind=self._kind,
            attributes=self._attrs,
            record_exception=False,
            set_status_on_exception=False,
        )
        self._token = _attach(_with_span(span, parent))
        self._span = span
        return span

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        span = self._span
        try:
            if exc is not None and span.is_recording():
                if isinstance(exc, _CANCELLED):
                    span.set_attribute("llmgate.cancelled", True)
                else:
                    kind = _error_type(exc)
                    span.set_attribute("error.type", kind)
                    span.add_event("exception", {"exception.type": kind})
                    span.set_status(_ERROR)
        finally:
            _detach(self._token)
            span.end()

    async def __aenter__(self) -> Any:  # nullcontext takes `async with` too
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.__exit__(exc_type, exc, tb)
