"""The tools stage: llmgate's own tools run server-side, the caller's passed through, and the
caller sees one answer however many rounds it took.

    [[routes]] tools = ["weather", "crm"], max_tool_rounds = 4,
               tool_filler = { phrases = [...], after_ms = 700 }

llmgate's tools are added to the caller's (a caller's tool of the same name wins for that
turn). The model's answer streams on as it comes. When a round ends with tool calls that are
all llmgate's, they run in parallel, the assistant message and their results are appended,
and the model is asked again: up to `max_tool_rounds` rounds of tools, the one after them
with `tool_choice: "none"`. The caller never sees a delta of llmgate's own tool calls; every
chunk carries the first round's id, `created` and `model`; one role delta; usage (when the
caller asked for it) is one chunk summed over the rounds.

A round that mixes both (the model called one of ours and one of the caller's): the
caller's calls go out, renumbered from index 0 in the order they came, with
`finish_reason: "tool_calls"`, and llmgate's calls of that round are dropped, not run: the
caller runs its tools and asks again, and the model calls ours again if it still needs them.

At most `max_calls` of ours run in one round (a model asking for 500 at once is not obeyed):
the rest are answered with an error result saying they were not run, so that every call of
the assistant message has its tool message and the conversation stays valid for the provider.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import jsonschema
from msgspec import UNSET

from llmgate.config import FillerConfig
from llmgate.obs import tracing
from llmgate.pipeline import OPENED, Ask, Call, Opened, Piece, end_task, own_head
from llmgate.tools.base import Tool, ToolError
from llmgate.tools.registry import Toolbox
from llmgate.turn import ToolCallNote, ToolsNote

DETAIL_ARGUMENTS, DETAIL_RESULT = 2000, 500  # characters of a call the playground shows
log = logging.getLogger("llmgate.tools")
_ARGS_SHOWN = 200  # characters of a bad argument string the model is shown
MAX_CALLS_PER_ROUND = 16  # calls of ours run in one round; the rest are answered unrun


class ToolStage:
    name = "tools"

    def __init__(
        self,
        toolbox: Toolbox,
        sections: list[str],
        max_rounds: int,
        filler: FillerConfig | None,
        max_calls: int = MAX_CALLS_PER_ROUND,
    ) -> None:
        self.toolbox = toolbox
        self.sections = sections
        self.max_rounds = max_rounds
        self.filler = filler
        self.max_calls = max_calls
        self._phrases = itertools.cycle(filler.phrases if filler is not None else ())

    def wrap(self, inner: Call) -> Call:
        async def call(ask: Ask) -> AsyncIterator[Piece | Opened]:
            caller_tools = ask.body.get("tools")
            caller_tools = caller_tools if isinstance(caller_tools, list) else []
            theirs = {_tool_name(t) for t in caller_tools} - {None}
            ours = {
                name: entry
                for name, entry in self.toolbox.offered(self.sections).items()
                if name not in theirs  # the caller's tool of the same name wins
            }
            if not ours or _many_choices(ask.body):  # n > 1: one answer's tools cannot run
                async with aclosing(inner(ask)) as items:
                    async for item in items:
                        yield item
                return
            answer = _Answer(ask, ours)
            ask.body["tools"] = [*caller_tools, *(_schema(n, t) for n, (t, _) in ours.items())]
            options = ask.body.get("stream_options")
            options = dict(options) if isinstance(options, dict) else {}
            answer.usage_wanted = bool(options.get("include_usage"))
            ask.body["stream_options"] = {**options, "include_usage": True}
            try:
                for round_no in range(self.max_rounds + 1):
                    if round_no == self.max_rounds:
                        ask.body["tool_choice"] = "none"  # the last word is the model's
                    answer.begin_round(round_no, last=round_no == self.max_rounds)
                    async with aclosing(inner(ask)) as items:
                        async for item in items:
                            if item is OPENED:
                                if answer.opened:
                                    continue
                                answer.opened = True
                                yield item
                            elif isinstance(item, Piece):
                                out = answer.piece(item)
                                if out is not None:
                                    yield out
                            else:
                                yield item
                    if not answer.run_ours():
                        break
                    async with aclosing(self._run(answer, round_no)) as pieces:
                        async for piece in pieces:
                            yield piece
                if answer.usage_wanted and answer.usage is not None:
                    yield answer.usage_piece()
            finally:
                ask.turn.noted().tools = answer.note()

        return call

    async def _run(self, answer: _Answer, round_no: int) -> AsyncIterator[Piece]:
        """This round's calls of ours (the first `max_calls`), in parallel; a filler phrase if
        they run long."""
        calls = answer.our_calls()
        turn = answer.ask.turn
        began = round(turn.elapsed() * 1000, 1)
        answer.ask.body["messages"].append(answer.assistant_message(calls))
        run, over = calls[: self.max_calls], calls[self.max_calls :]
        tasks = [asyncio.ensure_future(self._one(answer, call, round_no)) for call in run]
        try:
            if self.filler is not None and self.filler.phrases and answer.ask.stream:
                _, pending = await asyncio.wait(tasks, timeout=self.filler.after_ms / 1000)
                if pending:
                    answer.filler = True
                    yield answer.content_piece(next(self._phrases) + " ", whole=True)
            results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                await end_task(task)  # a barge-in: every tool call stops, its request closed
            answer.round_ms.append([began, round(turn.elapsed() * 1000, 1)])
        if over:
            answer.not_run += len(over)
            results += [
                f"error: not run: at most {self.max_calls} tool calls run in one round;"
                " call it again if still needed"
            ] * len(over)
        for call, result in zip(calls, results, strict=True):
            answer.ask.body["messages"].append(
                {"role": "tool", "tool_call_id": call["id"], "content": result}
            )

    async def _one(self, answer: _Answer, call: dict[str, Any], round_no: int) -> str:
        name = call["function"]["name"]
        tool, metadata = answer.ours[name]
        started = time.perf_counter()
        error: str | None = None
        try:
            arguments = _arguments(call["function"]["arguments"], tool)
            with tracing.span("tool.call", tool=name, round=round_no + 1):
                result = await tool.call(arguments, _headers(metadata, answer.ask.turn.metadata))
        except ToolError as exc:
            error, result = str(exc), f"error: {exc}"
        except Exception as exc:  # a tool's own bug: the model hears a failure, never a trace
            log.error("tool %s failed (%s)", name, type(exc).__name__)
            error, result = type(exc).__name__, f"error: tool {name} failed"
        noted = ToolCallNote(
            name=name,
            round=round_no + 1,
            ok=error is None,
            ms=round((time.perf_counter() - started) * 1000, 1),
            # an MCP tool's name is the server's, not config's: its section is noted too
            server=tool.spec.server or UNSET,
            error=UNSET if error is None else error[:200],
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug("tool %s arguments %s", name, call["function"]["arguments"][:2000])
        answer.calls_noted.append(noted)
        detail = answer.ask.turn.detail
        if detail is not None:  # the playground shows what ran, and what it said
            detail.setdefault("tool_calls", {})[id(noted)] = {
                "arguments": call["function"]["arguments"][:DETAIL_ARGUMENTS],
                "result": result[:DETAIL_RESULT],
            }
        return result


class _Answer:
    """One turn's answer across its rounds: what the caller has been sent so far, and the
    tool calls of the round in progress."""

    def __init__(self, ask: Ask, ours: dict[str, tuple[Tool, dict[str, str]]]) -> None:
        self.ask = ask
        self.ours = ours
        self.opened = False
        self.head: dict[str, Any] | None = None  # the first round's id, created, model
        self.role_sent = False
        self.usage: dict[str, Any] | None = None
        self.usage_wanted = False
        self.round_usage: dict[str, Any] | None = None
        self.calls_noted: list[ToolCallNote] = []
        self.not_run = 0  # calls of ours over the cap of their round, answered unrun
        self.filler = False  # a filler phrase was said
        self.round_ms: list[list[float]] = []
        self.rounds = 0
        self.round_no = 0
        # The round's calls, by (the model's index, the how-many-th call at that index: a
        # provider that leaves `index` out sends each call whole, with an id of its own).
        self._calls: dict[tuple[int, int], dict[str, Any]] = {}  # ours
        self._theirs: dict[tuple[int, int], int] = {}  # -> the index the caller sees
        self._undecided: dict[tuple[int, int], list[dict[str, Any]]] = {}  # no name yet
        self._slot: dict[int, tuple[int, Any]] = {}
        self._text: list[str] = []
        self._finished = False
        self._last = False

    def begin_round(self, round_no: int, last: bool) -> None:
        self._add_round_usage()
        self.round_no, self.rounds, self._last = round_no, round_no + 1, last
        self._calls, self._theirs, self._text, self._finished = {}, {}, [], False
        self._undecided, self._slot = {}, {}

    def piece(self, piece: Piece) -> Piece | None:
        """The piece as the caller gets it (itself when nothing in it changes), or None."""
        view = piece.view
        if view.usage:
            self.round_usage = view.usage
        if self.head is None and view.id:
            self.head = {"id": view.id, "created": view.created, "model": view.model}
        changed = self.round_no > 0 or bool(view.usage)
        changed = changed or (
            piece.finish_reason is not None and (self._ours_only() or bool(self._undecided))
        )
        for c in view.choices:
            delta = c.delta
            if delta is None:
                continue
            if delta.tool_calls or (delta.role and self.role_sent):
                changed = True
            if isinstance(delta.content, str):
                self._text.append(delta.content)
        if not changed:
            self.role_sent = self.role_sent or any(
                c.delta is not None and c.delta.role for c in view.choices
            )
            return piece
        chunk = piece.decoded()
        if self.head is not None:
            chunk.update(self.head)
        if "usage" in chunk:
            chunk["usage"] = None  # one usage chunk, summed, at the very end
        choices = []
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("role"):
                if self.role_sent:
                    del delta["role"]
                self.role_sent = True
            calls = self._route_calls(delta.pop("tool_calls", None) or [])
            if choice.get("finish_reason") and self._undecided:
                calls += self._theirs_at_last()  # never named: not ours, so the caller's
            if calls:
                delta["tool_calls"] = calls
            if choice.get("finish_reason") and self._ours_only():
                self._finished = True
                # The answer goes on after our tools; after the last round it just ends
                # (a model that calls ours even when told not to is not run again).
                choice["finish_reason"] = "stop" if self._last else None
            if delta or choice.get("finish_reason") or choice.get("logprobs"):
                choices.append(choice)
        if not choices:  # usage alone, or nothing left of it
            return None
        chunk["choices"] = choices
        return Piece.of(chunk, piece.whole)  # an apology stays a phrase of its own

    def _route_calls(self, fragments: list[Any]) -> list[dict[str, Any]]:
        """Our calls' fragments kept aside; the caller's passed on, renumbered if ours came
        between them. A call is ours or theirs by its name; fragments before the name wait."""
        out: list[dict[str, Any]] = []
        for fragment in fragments:
            if not isinstance(fragment, dict):
                continue
            key = self._key(fragment)
            if key not in self._calls and key not in self._theirs:
                name = (fragment.get("function") or {}).get("name")
                if not isinstance(name, str):
                    self._undecided.setdefault(key, []).append(fragment)
                    continue
                held = [*self._undecided.pop(key, []), fragment]
                if name in self.ours:
                    self._calls[key] = {"type": "function", "function": {"arguments": ""}}
                    for part in held:
                        self._merge(key, part)
                else:
                    self._theirs[key] = len(self._theirs)
                    out += [self._renumbered(key, part) for part in held]
                continue
            if key in self._calls:
                self._merge(key, fragment)
            else:
                out.append(self._renumbered(key, fragment))
        return out

    def _key(self, fragment: dict[str, Any]) -> tuple[int, int]:
        index = fragment.get("index", 0)
        index = index if isinstance(index, int) else 0
        call_id = fragment.get("id")
        n, known = self._slot.get(index, (0, None))
        if call_id and known and call_id != known:
            n += 1  # a new call at the same index
        if call_id or index not in self._slot:
            self._slot[index] = (n, call_id or known)
        return (index, n)

    def _merge(self, key: tuple[int, int], fragment: dict[str, Any]) -> None:
        """A fragment of our call into the call: arguments appended, any other field the
        provider sent kept (one may need it back, as Gemini does its thought signature)."""
        call = self._calls[key]
        for field, value in fragment.items():
            if field == "function" and isinstance(value, dict):
                for part, text in value.items():
                    if part == "arguments" and isinstance(text, str):
                        call["function"]["arguments"] += text
                    elif text is not None:
                        call["function"][part] = text
            elif field != "index" and value is not None:
                call.setdefault(field, value)

    def _renumbered(self, key: tuple[int, int], fragment: dict[str, Any]) -> dict[str, Any]:
        index = self._theirs[key]
        return fragment if fragment.get("index") == index else {**fragment, "index": index}

    def _theirs_at_last(self) -> list[dict[str, Any]]:
        out = []
        for key, held in self._undecided.items():
            self._theirs[key] = len(self._theirs)
            out += [self._renumbered(key, part) for part in held]
        self._undecided = {}
        return out

    def _ours_only(self) -> bool:
        return bool(self._calls) and not self._theirs

    def run_ours(self) -> bool:
        """Whether the round ended in calls of ours alone (mixed: ours are dropped)."""
        if self._calls and self._theirs:
            for call in self._calls.values():
                self.calls_noted.append(ToolCallNote(
                    name=call["function"]["name"], round=self.round_no + 1, ok=False,
                    error="dropped: the round had the caller's calls too",
                ))
        return self._finished and self._ours_only() and not self._last

    def note(self) -> ToolsNote:
        return ToolsNote(
            calls=self.calls_noted,
            rounds=self.rounds,
            not_run=self.not_run or UNSET,
            filler=self.filler or UNSET,
            round_ms=self.round_ms,
        )

    def our_calls(self) -> list[dict[str, Any]]:
        calls = [self._calls[key] for key in sorted(self._calls)]
        for call in calls:
            call.setdefault("id", "call_" + os.urandom(12).hex())
        return calls

    def assistant_message(self, calls: list[dict[str, Any]]) -> dict[str, Any]:
        text = "".join(self._text)
        return {"role": "assistant", "content": text or None, "tool_calls": calls}

    def _add_round_usage(self) -> None:
        if self.round_usage is not None:
            self.usage = _summed(self.usage, self.round_usage)
            self.round_usage = None

    def _chunk(self, choices: list[dict[str, Any]], whole: bool = False, **extra: Any) -> Piece:
        head = self.head or own_head(self.ask)
        chunk = {"object": "chat.completion.chunk", **head, "choices": choices, **extra}
        return Piece.of(chunk, whole)

    def content_piece(self, text: str, whole: bool = False) -> Piece:
        delta: dict[str, Any] = {"content": text}
        if not self.role_sent:
            delta = {"role": "assistant", **delta}
            self.role_sent = True
        self._text.append(text)
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        return self._chunk([choice], whole=whole)

    def usage_piece(self) -> Piece:
        self._add_round_usage()
        return self._chunk([], usage=self.usage)


def _tool_name(tool: Any) -> str | None:
    if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
        name = tool["function"].get("name")
        return name if isinstance(name, str) else None
    return None


def _schema(name: str, tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, "parameters": tool.spec.parameters}
    if tool.spec.description:
        function["description"] = tool.spec.description
    return {"type": "function", "function": function}


def _arguments(raw: str, tool: Tool) -> dict[str, Any]:
    """The model's arguments, checked against the tool's schema."""
    try:
        arguments = json.loads(raw or "{}")
    except ValueError:
        raise ToolError(f"the arguments are not valid JSON: {raw[:_ARGS_SHOWN]!r}") from None
    if not isinstance(arguments, dict):
        raise ToolError("the arguments must be a JSON object")
    try:
        jsonschema.validate(arguments, tool.spec.parameters)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "arguments"
        message = f"the arguments do not match the schema ({where}: {exc.message[:200]})"
        raise ToolError(message) from None
    except jsonschema.SchemaError:
        pass  # the tool's own schema is broken: the tool will say what it makes of them
    return arguments


def _headers(wanted: dict[str, str], metadata: dict[str, Any]) -> dict[str, str]:
    """The turn's metadata a tool is configured to get, as headers (Agora's `context` too)."""
    context = metadata.get("context")
    context = context if isinstance(context, dict) else {}
    out = {}
    for key, header in wanted.items():
        value = metadata.get(key, context.get(key))
        if isinstance(value, str | int) and not isinstance(value, bool):
            text = str(value)
            if "\r" not in text and "\n" not in text:
                out[header] = text[:200]
    return out


def _summed(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """Usage added up, counts nested in `*_details` too."""
    out = dict(a or {})
    for key, value in b.items():
        mine = out.get(key)
        if isinstance(value, bool):
            out.setdefault(key, value)
        elif isinstance(value, int | float) and isinstance(mine, int | float):
            out[key] = mine + value
        elif isinstance(value, dict) and isinstance(mine, dict):
            out[key] = _summed(mine, value)
        elif key not in out or mine is None:
            out[key] = value
    return out


def _many_choices(body: dict[str, Any]) -> bool:
    n = body.get("n")
    return isinstance(n, int) and n > 1
