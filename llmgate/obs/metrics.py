"""Prometheus metrics, `llmgate_*`, read from each turn's record when it ends (the same
fields as its log line), plus a gauge of streams in flight and each provider's circuit.

Label values are bounded: routes and providers come from config.toml; a model is listed
under its name only when config.toml names it (an alias or a provider's `models`), else
"other"; tool names are configured ones. Never a request id, never free text.

With several worker processes (`--workers`), PROMETHEUS_MULTIPROC_DIR is set before this
module is imported and `render()` adds every worker's values up.
"""

from __future__ import annotations

import os
import platform
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from llmgate.turn import cached_tokens

if TYPE_CHECKING:
    from llmgate.turn import Notes, Turn

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Voice: the interesting range is a few ms (our own work) to a few s (a slow provider).
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
_OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
_CIRCUIT = {"closed": 0, "half_open": 1, "open": 2}

# A `_created` twin of every counter and histogram doubles the page and says nothing a
# scraper uses (process start time is below).
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)
if not MULTIPROCESS:  # with workers, each is a process of its own: no one process to show
    ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, _resident_memory_bytes...

REQUESTS = Counter(
    "llmgate_requests", "Turns by route, model, provider and status (499: the caller left)",
    ("route", "model", "provider", "status"), registry=REGISTRY,
)
SUPERSEDED = Counter(
    "llmgate_superseded", "Turns ended by a newer turn on their channel", ("route",),
    registry=REGISTRY,
)
ACTIVE = Gauge(
    "llmgate_active_streams", "Turns in flight", registry=REGISTRY, multiprocess_mode="livesum"
)
TTFT = Histogram(
    "llmgate_time_to_first_token_seconds", "Request received to first token sent",
    ("route", "provider"), buckets=_LATENCY, registry=REGISTRY,
)
UPSTREAM = Histogram(
    "llmgate_upstream_first_token_seconds",
    "Request sent to a provider to its first chunk (the provider's own latency)",
    ("provider",), buckets=_LATENCY, registry=REGISTRY,
)
OVERHEAD = Histogram(
    "llmgate_overhead_seconds",
    "Time to first token spent in llmgate, outside waiting on the provider",
    ("route",), buckets=_OVERHEAD, registry=REGISTRY,
)
TOKENS = Counter(
    "llmgate_tokens", "Tokens by provider and kind (prompt, completion)",
    ("provider", "kind"), registry=REGISTRY,
)
FALLBACKS = Counter(
    "llmgate_fallbacks", "Turns of an alias served by a target after the first",
    ("alias",), registry=REGISTRY,
)
HEDGES = Counter(
    "llmgate_hedges", "Second targets started because the first was slow", ("alias",),
    registry=REGISTRY,
)
ATTEMPT_FAILURES = Counter(
    "llmgate_upstream_failures", "Failed attempts at a provider, by error code",
    ("provider", "error"), registry=REGISTRY,
)
CIRCUIT = Gauge(
    "llmgate_circuit_state", "A provider's circuit: 0 closed, 1 half-open, 2 open",
    ("provider",), registry=REGISTRY, multiprocess_mode="livemax",
)
RETRIEVAL = Histogram(
    "llmgate_retrieval_seconds", "Knowledge-base retrieval time", ("route",),
    buckets=_LATENCY, registry=REGISTRY,
)
TOOL_CALLS = Counter(
    "llmgate_tool_calls", "Calls of llmgate's own tools by name and outcome",
    ("tool", "outcome"), registry=REGISTRY,
)
MODEL_FIRST = Histogram(
    "llmgate_time_to_model_first_token_seconds",
    "Request received to the provider's first chunk, on a route with stages (after retrieval "
    "and tool rounds; a waiting phrase or filler the caller heard first is the first token)",
    ("route", "provider"), buckets=_LATENCY, registry=REGISTRY,
)
BUILD = Gauge(
    "llmgate_build_info", "Always 1: the running llmgate's version and Python",
    ("version", "python"), registry=REGISTRY, multiprocess_mode="max",
)
RELOADS = Counter(
    "llmgate_config_reloads", "SIGHUP reloads by outcome (ok, failed)", ("outcome",),
    registry=REGISTRY,
)
LAST_RELOAD = Gauge(
    "llmgate_config_last_reload_success_timestamp_seconds",
    "When the running config was loaded (start-up or the last reload that took)",
    registry=REGISTRY, multiprocess_mode="max",
)
FIRST_SENTENCE = Histogram(
    "llmgate_time_to_first_sentence_seconds",
    "Request received to the answer's first whole sentence, on a route with a speech or "
    "audio stage (first token to first sentence is Agora's llm_ftfs)",
    ("route",), buckets=_LATENCY, registry=REGISTRY,
)
CALLS = Counter(
    "llmgate_calls", "Calls (Agora channels) that ended: no turn for server.call_idle_s",
    registry=REGISTRY,
)
CALL_SECONDS = Histogram(
    "llmgate_call_duration_seconds", "A call's first turn to its last",
    buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200), registry=REGISTRY,
)
STATE_SHARED = Gauge(
    "llmgate_state_shared",
    "1: limits, circuits and barge-in shared through Redis; 0: this process's own (Redis is "
    "down, or [state] is not configured)",
    registry=REGISTRY, multiprocess_mode="min",
)
FIRST_AUDIO = Histogram(
    "llmgate_time_to_first_audio_seconds", "Request received to first audio frame sent",
    ("engine",), buckets=_LATENCY, registry=REGISTRY,
)


class Names:
    """The label values config.toml allows: everything else is "other"."""

    def __init__(self, models: set[str], tools: set[str]) -> None:
        self.models = models
        self.tools = tools

    def model(self, name: str | None) -> str:
        return name if name in self.models else "other"

    def tool(self, name: Any) -> str:
        return name if name in self.tools else "other"


_children: dict[tuple, Any] = {}  # (metric, label values) -> its child, looked up once


def _child(metric: Any, *values: str) -> Any:
    key = (metric, values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


def observe(turn: Turn, names: Names) -> None:
    """A turn has ended: count it."""
    route, provider = turn.route, turn.provider or "none"
    _child(REQUESTS, route, names.model(turn.model), provider, str(turn.status)).inc()
    if turn.superseded:
        SUPERSEDED.labels(route).inc()
    if turn.first_token is not None:
        _child(TTFT, route, provider).observe(turn.first_token)
        if turn.upstream_first is not None:
            _child(UPSTREAM, provider).observe(turn.upstream_first)
            overhead = max(0.0, turn.first_token - turn.upstream_first)
            _child(OVERHEAD, route).observe(overhead)
    if turn.model_first is not None and turn.staged:
        _child(MODEL_FIRST, route, provider).observe(turn.model_first)
    if turn.first_sentence is not None:
        _child(FIRST_SENTENCE, route).observe(turn.first_sentence)
    usage = turn.usage
    if usage:
        for kind in ("prompt", "completion"):
            count = usage.get(f"{kind}_tokens")
            if type(count) is int and count > 0:
                TOKENS.labels(provider, kind).inc(count)
        cached = cached_tokens(usage)
        if cached is not None and cached > 0:
            TOKENS.labels(provider, "cached_prompt").inc(cached)
    if turn.notes is not None:
        _notes(turn, turn.notes, names)


def _notes(turn: Turn, notes: Notes, names: Names) -> None:
    upstream = notes.upstream
    if isinstance(upstream.alias, str) and isinstance(upstream.attempts, list):
        alias = names.model(upstream.alias)
        attempts = upstream.attempts
        if turn.status == 200 and len(attempts) > 1 and attempts[0].error:
            FALLBACKS.labels(alias).inc()
        if upstream.hedges:
            HEDGES.labels(alias).inc(upstream.hedges)
        for attempt in attempts:
            if attempt.error and attempt.error != "cancelled":
                provider = attempt.target.partition("/")[0]
                ATTEMPT_FAILURES.labels(provider, _code(attempt.error)).inc()
    if isinstance(notes.rag.retrieval_ms, float | int):
        RETRIEVAL.labels(turn.route).observe(notes.rag.retrieval_ms / 1000)
    if notes.tools is not None:
        for call in notes.tools.calls:
            # an MCP call under its [tools.NAME] (the server's own tool names are its to
            # choose, and to change: not a bounded label)
            section = call.server if isinstance(call.server, str) else call.name
            TOOL_CALLS.labels(names.tool(section), "ok" if call.ok else "error").inc()
    audio = notes.audio
    if audio is not None and audio.first_audio_ms is not None:
        FIRST_AUDIO.labels(audio.engine).observe(audio.first_audio_ms / 1000)


_CODES = {
    "upstream_error", "upstream_timeout", "provider_unavailable", "rate_limit_exceeded",
    "rate_limit_error", "invalid_api_key", "forbidden", "api_error",
}


def _code(error: str) -> str:
    return error if error in _CODES else "other"


def started(version: str) -> None:
    """The process serves: its build, and its config's load time."""
    BUILD.labels(version, platform.python_version()).set(1)
    LAST_RELOAD.set(time.time())
    for outcome in ("ok", "failed"):
        RELOADS.labels(outcome)  # both series exist from the start, at 0


def reloaded(ok: bool) -> None:
    RELOADS.labels("ok" if ok else "failed").inc()
    if ok:
        LAST_RELOAD.set(time.time())


def circuit(provider: str, state: str) -> None:
    CIRCUIT.labels(provider).set(_CIRCUIT.get(state, 0))


def call_ended(seconds: float) -> None:
    CALLS.inc()
    CALL_SECONDS.observe(seconds)


def state_shared(value: int) -> None:
    STATE_SHARED.set(value)


def render() -> bytes:
    """The Prometheus text format: this process's values, or every worker's added up."""
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)
