"""A turn's clock, for a caller that asks (`X-Llmgate-Timing: 1`): where its time went.

Every mark is in ms since the request arrived. The names of the three totals follow
Agora's turn analytics: `llm_ttft` (first token), `llm_ftfs` (first token to first
sentence), `llm_ttfa` (first audio). On a stream the clock is one SSE comment line just
before `data: [DONE]` (`: llmgate-timing {...}`: every SSE client skips comments); on a
non-streamed answer, a `Server-Timing` header.
"""

from __future__ import annotations

from typing import Any

import msgspec

from llmgate.turn import Turn, ms

_encode = msgspec.json.Encoder().encode


def clock(turn: Turn, detail: bool = False) -> dict[str, Any]:
    """The turn's marks as its caller may see them (no message text, no key). With
    `detail`, and the playground on, also what only the playground shows (turn.detail):
    the passages' sources and scores, each tool call's arguments and result."""
    out: dict[str, Any] = {"request_id": turn.id}
    turn_id = turn.metadata.get("turn_id")
    if type(turn_id) is int:
        out["turn_id"] = turn_id
    out["admitted"] = ms(turn.admitted)
    notes = turn.notes
    if notes is not None:
        rag = notes.rag
        if isinstance(rag.start_ms, float | int):
            end = rag.retrieval_ms if isinstance(rag.retrieval_ms, float | int) else None
            out["retrieval"] = {
                "start": rag.start_ms,
                "end": None if end is None else round(rag.start_ms + end, 2),
                "passages": rag.hits if isinstance(rag.hits, int) else 0,
            }
        if isinstance(rag.waiting_ms, float | int):
            out["waiting_phrase"] = rag.waiting_ms
    attempts = _attempts(turn)
    if attempts:
        out["attempts"] = attempts
    if notes is not None and notes.tools is not None and notes.tools.round_ms:
        calls = notes.tools.calls
        # with `detail`: each call's arguments and result, kept by the tool stage
        said = (turn.detail or {}).get("tool_calls", {}) if detail else {}
        out["tool_rounds"] = [
            {
                "start": start,
                "end": end,
                "calls": [
                    {"tool": c.name, "ms": c.ms if isinstance(c.ms, float) else None,
                     "ok": c.ok, **said.get(id(c), {})}
                    for c in calls if c.round == i + 1
                ],
            }
            for i, (start, end) in enumerate(notes.tools.round_ms)
        ]
    out["first_token"] = ms(turn.first_token)
    # a stage marks the sentence whole as it passes, just before the writer sends its first
    # token: it is heard no sooner than that token
    sentence = turn.first_sentence
    if sentence is not None and turn.first_token is not None:
        sentence = max(sentence, turn.first_token)
    out["first_sentence"] = ms(sentence)
    out["first_audio"] = ms(turn.first_audio)
    out["done"] = ms(turn.elapsed())
    out["llm_ttft"] = out["first_token"]
    if sentence is not None and turn.first_token is not None:
        out["llm_ftfs"] = ms(sentence - turn.first_token)
    out["llm_ttfa"] = out["first_audio"]
    if detail and turn.detail and "sources" in turn.detail and "retrieval" in out:
        out["retrieval"]["sources"] = turn.detail["sources"]
    return out


def _attempts(turn: Turn) -> list[dict[str, Any]]:
    notes = turn.notes
    if notes is not None and isinstance(notes.upstream.attempts, list):
        attempts = [
            {
                "target": a.target,
                "start": a.start_ms if isinstance(a.start_ms, float | int) else None,
                "end": round(a.start_ms + a.ms, 2) if isinstance(a.start_ms, float | int) else None,
                "outcome": a.error if isinstance(a.error, str) else "won",
            }
            for a in notes.upstream.attempts
        ]
        for attempt in attempts:  # the one that answered: its headers and first token
            if attempt["outcome"] == "won":
                _answered(turn, attempt)
        return attempts
    if turn.provider is None or turn.model_first is None:
        return []
    attempt: dict[str, Any] = {"target": f"{turn.provider}/{turn.model}"}
    if turn.upstream_status is not None:
        attempt["start"] = ms(turn.upstream_status[0] - turn.started)
    _answered(turn, attempt)
    attempt["outcome"] = "won" if turn.status < 400 else str(turn.error)
    return [attempt]


def _answered(turn: Turn, attempt: dict[str, Any]) -> None:
    """`status` (the provider's headers came) and `first_token` (its first chunk)."""
    if turn.upstream_status is not None:
        attempt["status"] = ms(turn.upstream_status[1] - turn.started)
    if turn.model_first is not None:
        attempt["first_token"] = ms(turn.model_first)


def comment(turn: Turn) -> bytes:
    """The SSE comment line that carries the clock on a stream."""
    return b": llmgate-timing " + _encode(clock(turn, detail=True)) + b"\n\n"


def server_timing(turn: Turn) -> str:
    """The clock's marks as a Server-Timing header (RFC: `name;dur=ms`)."""
    marks = clock(turn)
    parts = [
        f"{name};dur={marks[name]}"
        for name in ("admitted", "waiting_phrase", "first_token", "first_sentence",
                     "first_audio", "done")
        if isinstance(marks.get(name), float | int)
    ]
    retrieval = marks.get("retrieval")
    if retrieval and retrieval.get("end") is not None:
        parts.insert(1, f"retrieval;dur={round(retrieval['end'] - retrieval['start'], 2)}")
    return ", ".join(parts)
