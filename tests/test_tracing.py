"""Traces: spans exported over OTLP/HTTP to a collector in the test, parents, errors, off.

The `collector` fixture is for other tests too (`from tests.test_tracing import collector`):
an OTLP/HTTP receiver on 127.0.0.1 whose `.url` is the [otel] endpoint and whose `.spans`
are the spans it got. The SDK exports from a thread of its own, synchronously: let the loop
run while it does (`await flush()`, or `await collector.wait(n)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from llmgate.config import OtelConfig
from llmgate.obs import tracing
from tests.conftest import API_KEY
from tests.fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@dataclass
class CollectedSpan:
    name: str
    kind: str  # "SERVER", "CLIENT", "INTERNAL", ...
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str | None  # None: a root
    trace_state: str
    attributes: dict[str, Any]
    status: str  # "UNSET", "OK" or "ERROR"
    events: list[tuple[str, dict[str, Any]]]
    resource: dict[str, Any]


@dataclass
class Collector:
    url: str = ""  # http://127.0.0.1:PORT/v1/traces
    spans: list[CollectedSpan] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)  # each request's body, as sent

    def named(self, name: str) -> list[CollectedSpan]:
        return [s for s in self.spans if s.name == name]

    def one(self, name: str) -> CollectedSpan:
        found = self.named(name)
        assert len(found) == 1, f"{len(found)} spans named {name!r}: {self.spans}"
        return found[0]

    async def wait(self, count: int, timeout: float = 10.0) -> None:
        """Until `count` spans came (the SDK exports every 5 s unless flushed)."""
        deadline = time.monotonic() + timeout
        while len(self.spans) < count:
            assert time.monotonic() < deadline, f"{len(self.spans)} of {count} spans came"
            await asyncio.sleep(0.02)

    async def _traces(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        body = await request.read()
        self.bodies.append(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        for resource_spans in message.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(_decode(s, resource) for s in scope_spans.spans)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )


def _value(any_value: Any) -> Any:
    which = any_value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    if which == "kvlist_value":
        return _attributes(any_value.kvlist_value.values)
    return getattr(any_value, which)


def _attributes(key_values: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in key_values}


def _decode(span: Any, resource: dict[str, Any]) -> CollectedSpan:
    from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

    return CollectedSpan(
        name=span.name,
        kind=Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex() or None,
        trace_state=span.trace_state,
        attributes=_attributes(span.attributes),
        status=Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
        events=[(e.name, _attributes(e.attributes)) for e in span.events],
        resource=resource,
    )


@pytest.fixture
async def collector(aiohttp_server) -> Collector:
    received = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", received._traces)
    server = await aiohttp_server(app)
    received.url = str(server.make_url("/v1/traces"))
    return received


async def flush() -> None:
    """Export what is held and turn tracing off; in a thread, so the collector can answer."""
    await asyncio.to_thread(tracing.shutdown)


@pytest.fixture
async def traced(collector):
    tracing.setup(OtelConfig(endpoint=collector.url, service_name="llmgate-test"))
    yield collector
    await flush()


@pytest.fixture(autouse=True)
async def _off_afterwards():
    yield
    await flush()


def traceparent(sampled: bool = True) -> dict[str, str]:
    flags = "01" if sampled else "00"
    return {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-{flags}", "tracestate": "vendor=opaque"}


async def test_a_turn_and_its_children_are_exported_with_their_parents(traced):
    with tracing.turn_span({}, route="/chat/completions", model="voice") as turn:
        assert turn is not None
        trace_id = tracing.current_trace_id()
        with tracing.span("upstream.attempt", provider="fake", model="gpt", n=None) as attempt:
            tracing.set_attrs(attempt, outcome="ok", first_token_ms=12.5, bogus={"x": 1})
            with tracing.span("tts.synthesize", engine="piper", characters=42):
                pass
        tracing.fail(turn, 502, "upstream_error")
    assert tracing.current_trace_id() is None  # the turn's context is left behind
    await flush()

    root = traced.one("chat.completions")
    up = traced.one("upstream.attempt")
    tts = traced.one("tts.synthesize")
    assert root.parent_span_id is None and root.kind == "SERVER"
    assert up.parent_span_id == root.span_id and up.kind == "CLIENT"
    assert tts.parent_span_id == up.span_id and tts.kind == "INTERNAL"
    assert {root.trace_id, up.trace_id, tts.trace_id} == {trace_id}
    assert root.resource["service.name"] == "llmgate-test"
    assert root.attributes == {
        "http.route": "/chat/completions",
        "gen_ai.request.model": "voice",
        "http.response.status_code": 502,
        "error.type": "upstream_error",
    }
    assert root.status == "ERROR"
    assert up.attributes == {
        "gen_ai.system": "fake",
        "gen_ai.request.model": "gpt",
        "llmgate.outcome": "ok",
        "llmgate.first_token_ms": 12.5,
    }
    assert up.status == "UNSET"
    assert tts.attributes == {"llmgate.engine": "piper", "llmgate.characters": 42}


async def test_an_incoming_traceparent_is_continued(traced):
    with tracing.turn_span(traceparent()):
        assert tracing.current_trace_id() == TRACE_ID
        with tracing.span("rag.retrieve"):
            pass
    with tracing.turn_span({"traceparent": "00-not-a-trace-01"}):  # a root of its own
        assert tracing.current_trace_id() not in (None, TRACE_ID)
    await flush()

    root, other = sorted(traced.named("chat.completions"), key=lambda s: s.trace_id != TRACE_ID)
    child = traced.one("rag.retrieve")
    assert other.trace_id != TRACE_ID and other.parent_span_id is None
    assert root.trace_id == TRACE_ID and root.parent_span_id == PARENT_ID
    assert root.trace_state == "vendor=opaque"
    assert child.trace_id == TRACE_ID and child.parent_span_id == root.span_id


async def test_a_task_started_in_the_turn_is_its_child(traced):
    async def call_tool(name: str) -> None:
        await asyncio.sleep(0)
        with tracing.span("tool.call", tool=name):
            await asyncio.sleep(0.01)

    with tracing.turn_span({}):
        tasks = [asyncio.create_task(call_tool(n)) for n in ("weather", "time")]
    await asyncio.gather(*tasks)  # they finish after the turn's block was left
    await flush()

    root = traced.one("chat.completions")
    calls = traced.named("tool.call")
    assert sorted(c.attributes["gen_ai.tool.name"] for c in calls) == ["time", "weather"]
    assert all(c.parent_span_id == root.span_id for c in calls)
    assert all(c.trace_id == root.trace_id for c in calls)


async def test_spans_go_out_from_the_exporters_thread_while_the_loop_runs(collector, monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")  # ms; the default is 5 s
    tracing.setup(OtelConfig(endpoint=collector.url))
    with tracing.turn_span({}), tracing.span("rag.retrieve", hits=3):
        pass
    await collector.wait(2)  # no flush: the batch processor sent them on its own
    assert collector.one("rag.retrieve").attributes == {"llmgate.hits": 3}


def test_shutdown_is_bounded_when_the_collector_is_down(monkeypatch):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(tracing, "SHUTDOWN_S", 0.3)
    tracing.setup(OtelConfig(endpoint=f"http://127.0.0.1:{port}/v1/traces"))
    with tracing.turn_span({}):
        pass
    exporter = tracing._provider._active_span_processor._span_processors[0].span_exporter
    start = time.monotonic()
    tracing.shutdown()  # the exporter would retry for 10 s
    assert time.monotonic() - start < 2.5
    assert tracing.span("x") is tracing.span("y")  # off again
    exporter.shutdown()  # ends its retries, not to log after the test
    for thread in threading.enumerate():
        if thread.name == "llmgate-otel-shutdown":
            thread.join(5)


async def test_cancelled_is_not_an_error_and_still_propagates(traced):
    started = asyncio.Event()

    async def speak() -> None:
        with tracing.span("tts.synthesize", engine="piper"):
            started.set()
            await asyncio.sleep(30)

    with tracing.turn_span({}):
        task = asyncio.create_task(speak())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await flush()

    tts = traced.one("tts.synthesize")
    assert tts.attributes == {"llmgate.engine": "piper", "llmgate.cancelled": True}
    assert tts.status == "UNSET" and tts.events == []
    assert traced.one("chat.completions").status == "UNSET"


async def test_an_exception_records_its_type_never_its_text(traced):
    class ProviderDown(Exception):
        pass

    with pytest.raises(ProviderDown), tracing.turn_span({}):
        with pytest.raises(ValueError, match="my secret words"), tracing.span("tool.call"):
            raise ValueError("the caller said my secret words")
        raise ProviderDown("upstream said my other secret")
    await flush()

    tool, root = traced.one("tool.call"), traced.one("chat.completions")
    assert tool.status == "ERROR" and tool.attributes == {"error.type": "ValueError"}
    assert tool.events == [("exception", {"exception.type": "ValueError"})]
    assert root.status == "ERROR"
    assert root.attributes["error.type"].endswith(".ProviderDown")
    body = b"".join(traced.bodies)
    assert b"ValueError" in body  # the collector did see the spans ...
    assert b"secret" not in body and b"Traceback" not in body  # ... and no text, no traceback


async def test_sample_ratio_0_drops_roots_but_follows_a_sampled_parent(collector):
    tracing.setup(OtelConfig(endpoint=collector.url, sample_ratio=0.0))
    for _ in range(20):
        with tracing.turn_span({}) as turn, tracing.span("upstream.attempt") as attempt:
            assert turn is not None and not turn.is_recording()
            tracing.set_attrs(attempt, outcome="ok")
    with tracing.turn_span(traceparent(sampled=False)), tracing.span("rag.retrieve"):
        pass
    with tracing.turn_span(traceparent(sampled=True)), tracing.span("tool.call"):
        pass
    await flush()

    assert sorted(s.name for s in collector.spans) == ["chat.completions", "tool.call"]
    root = collector.one("chat.completions")
    assert root.trace_id == TRACE_ID and root.parent_span_id == PARENT_ID


async def test_off_yields_none_and_exports_nothing(collector):
    tracing.setup(None)
    assert tracing.span("a") is tracing.span("b") is tracing.turn_span({})
    with tracing.turn_span(traceparent(), route="/x") as turn, tracing.span("upstream.x") as up:
        assert turn is None and up is None
        tracing.set_attrs(up, outcome="ok")
        tracing.fail(turn, 500, "internal")
        assert tracing.current_trace_id() is None
    with pytest.raises(asyncio.CancelledError), tracing.span("tts.synthesize"):
        raise asyncio.CancelledError
    async with tracing.span("rag.retrieve") as handle:
        assert handle is None
    await asyncio.sleep(0.1)
    await flush()
    assert collector.spans == [] and collector.bodies == []


def test_off_costs_next_to_nothing():
    """Off, a span costs what a call that returns a shared nullcontext costs."""
    tracing.setup(None)
    null = contextlib.nullcontext()

    def bare_span(name: str, **attrs: Any) -> Any:
        return null

    def bare_set_attrs(handle: Any, **attrs: Any) -> None:
        return None

    def per_span(span: Any, set_attrs: Any) -> float:
        start = time.perf_counter()
        for _ in range(20_000):
            with span("upstream.attempt", provider="a", model="m") as handle:
                set_attrs(handle, outcome="ok")
        return (time.perf_counter() - start) / 20_000

    ours = bare = float("inf")
    for _ in range(7):  # interleaved, best of each: load on the machine slows both
        ours = min(ours, per_span(tracing.span, tracing.set_attrs))
        bare = min(bare, per_span(bare_span, bare_set_attrs))
    assert ours < 1.5 * bare + 2e-7, f"{ours * 1e9:.0f} ns a span, {bare * 1e9:.0f} ns bare"


_OFF_SCRIPT = """
import asyncio, sys
from llmgate.obs import tracing

async def main():
    tracing.setup(None)
    with tracing.turn_span({"traceparent": sys.argv[1]}, route="/x") as turn:
        with tracing.span("upstream.attempt", provider="p") as up:
            tracing.set_attrs(up, outcome="ok")
        tracing.fail(turn, 502, "upstream_error")
        assert turn is None and tracing.current_trace_id() is None
    try:
        with tracing.span("tool.call"):
            raise ValueError("x")
    except ValueError:
        pass
    tracing.shutdown()

asyncio.run(main())
print(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"))
"""


def test_off_never_imports_opentelemetry():
    result = subprocess.run(
        [sys.executable, "-c", _OFF_SCRIPT, traceparent()["traceparent"]],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- through the gateway: a turn's span and its children --------------------------------


async def test_a_turn_is_traced_with_its_attempts_and_tool_calls(
    make_gateway, upstream, collector, aiohttp_server
):
    from tests.test_tools import CITY, ToolService

    tools = ToolService()
    tool_server = await aiohttp_server(tools.app)
    second = FakeUpstream()
    second_server = await aiohttp_server(second.app)
    gw = await make_gateway(
        otel={"endpoint": collector.url},
        providers={
            "fake": {"base_url": upstream.url, "idle_timeout_s": 30},
            "backup": {"base_url": str(second_server.make_url("/v1"))},
        },
        models={"voice": ["fake/status-503", "backup/text"]},
        tools={
            "weather": {
                "kind": "http",
                "url": str(tool_server.make_url("/weather")),
                "description": "The weather.",
                "parameters": CITY,
            }
        },
        routes=[
            {"path": "/chat/completions"},
            {"path": "/tools/chat/completions", "tools": ["weather"]},
        ],
    )
    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "traceparent": f"00-{trace_id}-{parent}-01",
    }
    async with aiohttp.ClientSession() as session:
        for path, model in (
            ("/v1/chat/completions", "voice"),
            ("/tools/chat/completions", "use-tools-weather"),
        ):
            said = [{"role": "user", "content": "my very private plan"}]
            body = {"model": model, "stream": True, "messages": said}
            async with session.post(gw.make_url(path), json=body, headers=headers) as resp:
                assert resp.status == 200
                await resp.read()
    await flush()
    turns = collector.named("chat.completions")
    assert len(turns) == 2 and all(t.trace_id == trace_id for t in turns)
    assert all(t.parent_span_id == parent and t.kind == "SERVER" for t in turns)
    alias, tooled = sorted(turns, key=lambda t: t.attributes["http.route"])
    attempts = [s for s in collector.named("upstream.attempt") if s.parent_span_id == alias.span_id]
    assert [a.attributes["gen_ai.system"] for a in attempts] == ["fake", "backup"]
    assert [a.status for a in attempts] == ["ERROR", "UNSET"]
    assert alias.attributes["gen_ai.request.model"] == "text"
    assert alias.attributes["http.response.status_code"] == 200
    (call,) = collector.named("tool.call")
    assert (
        call.parent_span_id == tooled.span_id and call.attributes["gen_ai.tool.name"] == "weather"
    )
    # Nothing a caller said, and no key, reaches a span.
    assert collector.bodies
    assert not any(b"private plan" in b or API_KEY.encode() in b for b in collector.bodies)
