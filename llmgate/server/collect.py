"""The one collector: a non-streamed request on a staged route, answered as one
chat.completion assembled from the pieces the route's stages let through.

The provider is asked to stream (with usage), so every stage works on one shape of answer.
The assembled answer carries what the provider's own non-streamed answer would: id,
created, model, system_fingerprint, service_tier, usage (details and all); per choice the
message's content, refusal, tool calls, audio and annotations, its logprobs, its
finish_reason.
"""

from __future__ import annotations

import base64
from contextlib import aclosing
from typing import Any

from llmgate.errors import UpstreamUnavailable
from llmgate.pipeline import Ask, Call, Piece
from llmgate.protocol import ChunkView, encoder
from llmgate.upstream.call import MAX_ANSWER_BODY, model_audio


class _Choice:
    __slots__ = (
        "annotations", "audio", "content", "finish_reason", "logprobs", "refusal", "role",
        "tool_calls",
    )

    def __init__(self) -> None:
        self.role = "assistant"
        self.content: list[str] | None = None
        self.refusal: list[str] | None = None
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.audio: _Audio | None = None  # a model's own audio (modalities with "audio")
        self.annotations: list[Any] | None = None
        self.logprobs: dict[str, Any] | None = None  # {"content": [...], "refusal": [...]}

    def add_logprobs(self, logprobs: Any) -> None:
        """A chunk's logprobs: each list (content, refusal) goes on where the last ended."""
        if not isinstance(logprobs, dict):
            return
        if self.logprobs is None:
            self.logprobs = {}
        for key, value in logprobs.items():
            if isinstance(value, list) and isinstance(self.logprobs.get(key), list):
                self.logprobs[key].extend(value)  # (a list of our own: made below)
            elif value is not None or key not in self.logprobs:
                self.logprobs[key] = list(value) if isinstance(value, list) else value

    def message(self) -> dict[str, Any]:
        calls = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        content = None if self.content is None else "".join(self.content)
        message: dict[str, Any] = {"role": self.role, "content": content}
        if self.refusal is not None:
            message["refusal"] = "".join(self.refusal)
        if calls:
            message["tool_calls"] = calls
        if self.audio is not None:
            message["audio"] = self.audio.message()
        if self.annotations is not None:
            message["annotations"] = self.annotations
        return message


class _Audio:
    """`delta.audio` pieces as the one `message.audio` of a chat.completion: the base64
    fragments decoded and joined (base64 strings cannot simply be concatenated)."""

    __slots__ = ("data", "fields", "transcript")

    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}
        self.transcript: list[str] = []
        self.data = bytearray()

    def add(self, delta: dict[str, Any]) -> None:
        for key, value in delta.items():
            if key == "transcript" and isinstance(value, str):
                self.transcript.append(value)
            elif key == "data" and isinstance(value, str):
                self.data += model_audio(value)
            else:
                self.fields[key] = value

    def message(self) -> dict[str, Any]:
        return {
            **self.fields,
            "data": base64.b64encode(self.data).decode(),
            "transcript": "".join(self.transcript),
        }


class Completion:
    """Chunks in, one chat.completion out."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.choices: dict[int, _Choice] = {}
        self.usage: dict[str, Any] | None = None

    def add(self, view: ChunkView) -> None:
        if not self.head.get("id") and view.id:  # Azure's first chunk has an empty id
            self.head = {"id": view.id, "created": view.created, "model": view.model}
            if view.system_fingerprint is not None:
                self.head["system_fingerprint"] = view.system_fingerprint
        if view.service_tier is not None:
            self.head["service_tier"] = view.service_tier
        if view.usage:
            self.usage = view.usage
        for c in view.choices:
            choice = self.choices.get(c.index)
            if choice is None:
                choice = self.choices[c.index] = _Choice()
            if c.finish_reason:
                choice.finish_reason = c.finish_reason
            if c.logprobs is not None:
                choice.add_logprobs(c.logprobs)
            delta = c.delta
            if delta is None:
                continue
            if isinstance(delta.role, str) and delta.role:
                choice.role = delta.role
            if isinstance(delta.content, str):
                choice.content = _appended(choice.content, delta.content)
            if isinstance(delta.refusal, str):
                choice.refusal = _appended(choice.refusal, delta.refusal)
            for call in delta.tool_calls or ():
                _merge_tool_call(choice.tool_calls, call)
            if isinstance(delta.audio, dict):
                if choice.audio is None:
                    choice.audio = _Audio()
                choice.audio.add(delta.audio)
            if isinstance(delta.annotations, list):
                if choice.annotations is None:
                    choice.annotations = []
                choice.annotations.extend(delta.annotations)

    @property
    def finish_reason(self) -> str | None:
        return next((c.finish_reason for c in self.choices.values() if c.finish_reason), None)

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "id": self.head.get("id") or "chatcmpl-llmgate",
            "object": "chat.completion",
            "created": self.head.get("created") or 0,
            "model": self.head.get("model") or "",
            "choices": [
                {
                    "index": i,
                    "message": self.choices[i].message(),
                    "finish_reason": self.choices[i].finish_reason,
                    "logprobs": self.choices[i].logprobs,
                }
                for i in sorted(self.choices)
            ],
        }
        for key in ("system_fingerprint", "service_tier"):
            if key in self.head:
                body[key] = self.head[key]
        if self.usage is not None:
            body["usage"] = self.usage
        return encoder.encode(body)


def _appended(parts: list[str] | None, text: str) -> list[str]:
    if parts is None:
        return [text]
    parts.append(text)
    return parts


def _merge_tool_call(calls: dict[int, dict[str, Any]], delta: Any) -> None:
    """Tool-call deltas by index: the first carries id and name, arguments arrive in parts."""
    call = calls.get(delta.index)
    if call is None:
        call = calls[delta.index] = {
            "id": delta.id or "",
            "type": delta.type or "function",
            "function": {"name": "", "arguments": ""},
        }
    elif delta.id:
        call["id"] = delta.id
    if delta.function is not None:
        if delta.function.name:
            call["function"]["name"] += delta.function.name
        if delta.function.arguments:
            call["function"]["arguments"] += delta.function.arguments


def streamed_ask(ask: Ask) -> Ask:
    """The provider is asked to stream, with usage in its last chunk."""
    options = ask.body.get("stream_options")
    options = dict(options) if isinstance(options, dict) else {}
    options["include_usage"] = True
    ask.body["stream"] = True
    ask.body["stream_options"] = options
    return ask


async def collect(call: Call, ask: Ask) -> Completion:
    """Run the route's call to its end and gather what it said, at most MAX_ANSWER_BODY
    bytes of chunks (a plain route's non-streamed answer has the same bound)."""
    completion = Completion()
    size = 0
    async with aclosing(call(streamed_ask(ask))) as items:
        async for item in items:
            if isinstance(item, Piece):
                size += len(item.data)
                if size > MAX_ANSWER_BODY:
                    raise UpstreamUnavailable(
                        f"provider '{ask.turn.provider}' sent an oversized answer"
                    )
                completion.add(item.view)
    return completion
