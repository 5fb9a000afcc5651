"""One request's life: its id, what it asked for, how it ended, its log line."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from llmgate.errors import logged_error, new_request_id

log = logging.getLogger("llmgate.turn")

CLIENT_CLOSED = 499
SUPERSEDED = "superseded"  # the log's error for a turn a newer one on its channel ended

# The log line names metadata, never repeats it at length: Agora merges any `llm.params`
# into the body, and a caller's stray field can hold a whole document.
META_VALUE_CHARS = 200
META_TOTAL_CHARS = 2048
_encode = msgspec.json.Encoder().encode
_to_builtins = msgspec.to_builtins
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


class Turn:
    __slots__ = (
        "admitted",
        "chunks",
        "detail",
        "error",
        "finish_reason",
        "first_audio",
        "first_sentence",
        "first_token",
        "id",
        "key",
        "metadata",
        "model",
        "model_first",
        "notes",
        "provider",
        "rounds",
        "route",
        "staged",
        "started",
        "status",
        "stream",
        "superseded",
        "timing",
        "upstream_first",
        "upstream_status",
        "usage",
    )

    def __init__(self, route: str, request_id: str | None = None) -> None:
        # A caller's own X-Request-Id, if it is a short safe string, names the turn (the
        # id its logs already carry); anything else is replaced by ours.
        if request_id is None or not _SAFE_ID.fullmatch(request_id):
            request_id = new_request_id()
        self.id = request_id
        self.route = route
        self.key: str | None = None  # the caller key's name (never the key)
        self.started = time.perf_counter()
        self.model: str | None = None
        self.provider: str | None = None
        self.stream = False
        self.status = 200
        self.error: str | None = None
        self.superseded = False  # set by Channels: a newer turn on the channel took over
        # The turn's clock, in seconds since it arrived (None: not reached).
        self.admitted: float | None = None  # key, limits and body done: the turn may start
        self.first_token: float | None = None
        self.first_sentence: float | None = None  # (a route with a speech or audio stage)
        self.first_audio: float | None = None
        self.timing = False  # the caller asked for the clock (X-Llmgate-Timing: 1)
        # (with timing) the last upstream request's (sent, headers came), perf_counter
        self.upstream_status: tuple[float, float] | None = None
        # (with timing and the playground on) what only the playground shows: the passages'
        # sources and scores, each tool call's arguments and result; never logged
        self.detail: dict[str, Any] | None = None
        self.upstream_first: float | None = None  # the provider's own: request -> first chunk
        self.model_first: float | None = None  # turn start -> the provider's first chunk
        self.staged = False  # on a route with stages (one may speak before the model)
        self.chunks = 0
        self.rounds = 0
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.metadata: dict[str, Any] = {}
        self.notes: Notes | None = None

    def end(self, status: int, error: str | None = None) -> None:
        """The one place a turn's outcome is recorded (200 until something else is)."""
        self.status = status
        if status == CLIENT_CLOSED and self.superseded:
            self.error = SUPERSEDED
        else:
            self.error = logged_error(error)

    def mark_first_token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter() - self.started

    def elapsed(self) -> float:
        """Seconds since the request arrived."""
        return time.perf_counter() - self.started

    def mark_first_sentence(self) -> None:
        if self.first_sentence is None:
            self.first_sentence = time.perf_counter() - self.started

    def add_round(self, chunks: int, finish_reason: str | None, usage: Any) -> None:
        """One upstream answer ended: chunks and usage add up, the last finish_reason stands."""
        self.rounds += 1
        self.chunks += chunks
        if finish_reason:
            self.finish_reason = finish_reason
        if isinstance(usage, dict):
            self.usage = _add_usage(self.usage, usage)

    def noted(self) -> Notes:
        """What the stages record of this turn (made on first use: a plain turn has none)."""
        if self.notes is None:
            self.notes = Notes()
        return self.notes

    def fields(self) -> dict[str, Any]:
        """The log line's fields. Never message text, never a key."""
        out: dict[str, Any] = {
            "request_id": self.id,
            "route": self.route,
            "key": self.key,
            "model": self.model,
            "provider": self.provider,
            "stream": self.stream,
            "status": self.status,
            "admitted_ms": ms(self.admitted),
            "ttft_ms": ms(self.first_token),
            "duration_ms": ms(time.perf_counter() - self.started),
            "chunks": self.chunks,
        }
        if self.first_sentence is not None:
            out["first_sentence_ms"] = ms(self.first_sentence)
        if self.first_audio is not None:
            out["first_audio_ms"] = ms(self.first_audio)
        if self.rounds > 1:
            out["rounds"] = self.rounds
        if self.finish_reason:
            out["finish_reason"] = self.finish_reason
        if self.usage:  # (a provider's: at most 16 keys of 64 characters go in a line)
            out["usage"] = {
                k: v
                for k, v in list(self.usage.items())[:16]
                if len(k) <= 64 and k.endswith("_tokens") and type(v) is int
            }
            cached = cached_tokens(self.usage)
            if cached is not None:
                out["cached_tokens"] = cached
        if self.error:
            out["error"] = self.error
        if self.notes is not None:
            out.update(self.notes.fields())
        if self.metadata:
            out["metadata"] = bounded(self.metadata)
        return out

    def log(self) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info("turn", extra={"turn": self.fields()})


# What the stages record of a turn, typed: metrics read these fields and the log line
# prints them, so neither depends on the other's spelling. UNSET: not recorded (left out
# of the line), where None is a recorded "none".


class _Note(msgspec.Struct, kw_only=True):
    pass


class AttemptNote(_Note):
    target: str
    ms: float
    start_ms: float | UnsetType = UNSET  # since the turn arrived
    error: str | UnsetType = UNSET  # a logged error code, or "cancelled"


class UpstreamNote(_Note):
    alias: str | UnsetType = UNSET  # on a plan of several targets, or an alias
    attempts: list[AttemptNote] | UnsetType = UNSET
    hedges: int | UnsetType = UNSET
    apology: bool | UnsetType = UNSET  # on_stream_error: whether it was said


class RagNote(_Note):
    start_ms: float | UnsetType = UNSET  # retrieval began, since the turn arrived
    retrieval_ms: float | UnsetType = UNSET
    hits: int | UnsetType = UNSET
    top_score: float | UnsetType | None = UNSET
    error: str | UnsetType = UNSET  # the search failed: its class name
    waiting: bool | UnsetType = UNSET  # the waiting phrase was said
    waiting_ms: float | UnsetType = UNSET  # when, since the turn arrived


class ToolCallNote(_Note):
    name: str
    round: int
    ok: bool
    ms: float | UnsetType = UNSET
    server: str | UnsetType = UNSET  # an MCP tool's [tools.NAME]
    error: str | UnsetType = UNSET


class ToolsNote(_Note):
    calls: list[ToolCallNote] = msgspec.field(default_factory=list)
    rounds: int | UnsetType = UNSET
    not_run: int | UnsetType = UNSET  # calls over a round's max_tool_calls
    filler: bool | UnsetType = UNSET
    # each round of llmgate's own tools: [start, end] in ms since the turn arrived
    round_ms: list[list[float]] = msgspec.field(default_factory=list)


class AudioNote(_Note):
    engine: str
    first_audio_ms: float | None
    audio_s: float


class SpeechNote(_Note):
    dropped_chars: int


class Notes:
    """One per turn that has stages or several targets; each stage fills its own."""

    __slots__ = ("audio", "rag", "speech", "tools", "upstream")

    def __init__(self) -> None:
        self.upstream = UpstreamNote()
        self.rag = RagNote()
        self.tools: ToolsNote | None = None
        self.audio: AudioNote | None = None
        self.speech: SpeechNote | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("upstream", "rag", "tools", "audio", "speech"):
            note = getattr(self, name)
            if note is not None and (shown := _to_builtins(note)):
                out[name] = shown
        return out


def ms(seconds: float | None) -> float | None:
    """Seconds as the log line and the clock show them: ms, to two places."""
    return None if seconds is None else round(seconds * 1000, 2)


def cached_tokens(usage: dict[str, Any]) -> int | None:
    """`usage.prompt_tokens_details.cached_tokens`, where the provider reports it."""
    details = usage.get("prompt_tokens_details")
    count = details.get("cached_tokens") if type(details) is dict else None
    return count if type(count) is int else None


def _add_usage(total: dict[str, Any] | None, usage: dict[str, Any]) -> dict[str, Any]:
    if total is None:
        return dict(usage)
    out = dict(total)
    for key, value in usage.items():
        if type(value) is int and type(out.get(key, 0)) is int:
            out[key] = out.get(key, 0) + value
        elif type(value) is dict and type(out.get(key)) is dict:  # *_tokens_details
            out[key] = _add_usage(out[key], value)
        elif key not in out:
            out[key] = value
    return out


def bounded(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata for a log line: each value at most ~200 characters, ~2 KB in all."""
    out: dict[str, Any] = {}
    size = 0
    for key, value in metadata.items():
        key = str(key)[:64]
        if isinstance(value, str):
            shown: Any = _clip(value)
            cost = len(shown)
        elif value is None or type(value) in (bool, int, float):
            shown, cost = value, 8
        else:
            text = _encode(value).decode()
            shown = value if len(text) <= META_VALUE_CHARS else _clip(text)
            cost = min(len(text), META_VALUE_CHARS)
        size += cost + len(key)
        if size > META_TOTAL_CHARS:
            out["truncated_keys"] = len(metadata) - len(out)
            break
        out[key] = shown
    return out


def _clip(text: str) -> str:
    if len(text) <= META_VALUE_CHARS:
        return text
    return f"{text[:META_VALUE_CHARS]}... ({len(text)} chars)"
