"""An in-process OpenAI-compatible upstream that speaks real SSE, scripted by model name.

The request's `model` picks the behaviour ("text", "crlf", "tools", "stall", "status-429" ...),
so one fake serves every test and each test reads as what the provider does.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import struct
from typing import Any

from aiohttp import web

CREATED = 1_700_000_000


def chunk(model: str, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **extra,
    }


def text_chunks(model: str, words: list[str]) -> list[dict]:
    out = [chunk(model, {"role": "assistant", "content": ""})]
    out += [chunk(model, {"content": w}) for w in words]
    out.append(chunk(model, {}, "stop"))
    return out


USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
WORDS = ["Hello", " there", ", h\u00e9llo \U0001f44b", "!"]
# An answer in markdown, cut where a marker spans two deltas, and what a TTS should get.
MARKDOWN = [
    "**Hel", "lo**", " there", "! See [the ", "docs](https://x.example/a", ")", " \U0001f44b",
    "\n\n## Next", "\n- `one`", "\n",
]
SPOKEN = "Hello there! See the docs\nNext\none"
TOOL_CALL_DELTAS = [
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "index": 0,
                "id": "call_abc",
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
        ],
    },
    {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]},
    {"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]},
]


def tone(seconds: float, rate: int = 24000, hz: float = 220.0) -> bytes:
    """PCM16 mono: a sine that is plainly not silence."""
    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * hz * t) * 12000).astype("<i2").tobytes()


def audio_chunks(model: str) -> list[dict]:
    """What an audio-capable model (gpt-4o-audio) streams: transcript pieces and base64
    PCM16 at 24 kHz in `delta.audio`, no `content`."""
    import base64

    pcm = tone(0.5)  # 24,000 bytes, in four reads of uneven size
    cuts = [0, 7001, 12000, 19999, len(pcm)]
    out = [chunk(model, {"role": "assistant", "content": None, "refusal": None})]
    out.append(chunk(model, {"audio": {"id": "audio_up", "transcript": "Hello"}}))
    out.append(chunk(model, {"audio": {"id": "audio_up", "transcript": " there."}}))
    for a, b in itertools.pairwise(cuts):
        data = base64.b64encode(pcm[a:b]).decode()
        out.append(chunk(model, {"audio": {"id": "audio_up", "data": data}}))
    out.append(chunk(model, {"audio": {"id": "audio_up", "expires_at": 1_700_003_600}}))
    out.append(chunk(model, {}, "stop"))
    return out


TOOL_ARGUMENTS = {
    "weather": '{"city": "Paris"}',
    "lookup": '{"who": "Ada"}',
    "get_weather": '{"city": "Rome"}',
    "echo": '{"text": "hi"}',
    "badjson": '{"city": Par',
    "badschema": '{"town": "Paris"}',
}


def tool_round(model: str, body: dict) -> list[dict]:
    """A model that calls tools: "use-tools-weather+lookup" calls both (in parallel, their
    fragments interleaved, arguments cut in three), after a sentence of its own; once the
    request carries tool results (or tool_choice is "none") it answers with what they said.
    "use-tools-always-..." calls again every round unless told "none"; "-badjson" and
    "-badschema" call weather with broken arguments."""
    spec = model.removeprefix("use-tools-")
    always = spec.startswith("always-")
    spec = spec.removeprefix("always-")
    late_name = spec.startswith("late-name-")  # the name in the call's second fragment
    no_index = spec.startswith("no-index-")  # each call whole, no `index` (some providers)
    spec = spec.removeprefix("late-name-").removeprefix("no-index-")
    messages = body.get("messages") or []
    results = [m["content"] for m in messages if m.get("role") == "tool"]
    usage = (body.get("stream_options") or {}).get("include_usage")
    if body.get("tool_choice") == "none" or (results and not always):
        words = ["Results: ", " | ".join(results) or "none", "."]
        out = text_chunks(model, words)
    else:
        names = spec.split("+")
        out = [chunk(model, {"role": "assistant", "content": "Let me see. "})]
        if no_index:
            for i, name in enumerate(names):
                whole = {"id": f"call_{i}_{len(results)}", "type": "function",
                         "function": {"name": name, "arguments": TOOL_ARGUMENTS[name]}}
                out.append(chunk(model, {"tool_calls": [whole]}))
            names = []
        for i, name in enumerate(names):
            tool = "weather" if name in ("badjson", "badschema") else name
            first = {"index": i, "id": f"call_{i}_{len(results)}", "type": "function",
                     "function": {"name": tool, "arguments": ""}}
            if late_name:
                del first["function"]["name"]
                out.append(chunk(model, {"tool_calls": [first]}))
                first = {"index": i, "function": {"name": tool}}
            out.append(chunk(model, {"tool_calls": [first]}))
        for part in range(3):
            for i, name in enumerate(names):
                args = TOOL_ARGUMENTS[name]
                cut = len(args) // 3
                piece = args[part * cut : (part + 1) * cut if part < 2 else None]
                delta = {"tool_calls": [{"index": i, "function": {"arguments": piece}}]}
                out.append(chunk(model, delta))
        out.append(chunk(model, {}, "tool_calls"))
    if usage:
        for c in out:
            c["usage"] = None
        out.append({**chunk(model, {}), "choices": [], "usage": USAGE})
    rounds = sum(1 for m in messages if m.get("tool_calls"))
    for c in out:  # each answer its own id and time, as a provider gives them
        c["id"], c["created"] = f"chatcmpl-round{rounds}", CREATED + rounds
    return out


def frame(obj: Any, eol: bytes = b"\n") -> bytes:
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return b"data: " + data + eol + eol


def reset(request: web.Request) -> None:
    """Close the connection with a TCP reset (SO_LINGER 0), not a FIN."""
    assert request.transport is not None
    sock = request.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    request.transport.abort()


class FakeUpstream:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.cancelled = 0
        self.finished = 0
        self.open_streams = 0  # requests being answered now
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.handle)
        self.app.router.add_post("/v1/audio/speech", self.speech)
        self.app.router.add_get("/v1/models", self.models)
        self.model_lists = 0  # GET /models served
        self.speech_requests: list[dict[str, Any]] = []
        self.speech_open = 0  # /audio/speech answers being written now
        self.fail_with: int | None = None  # every chat request answers this status

    async def models(self, request: web.Request) -> web.Response:
        self.model_lists += 1
        if self.fail_with is not None:
            return self.status(self.fail_with)
        ids = ["text", "markdown", "text"]  # a repeat is listed once
        data = [{"id": i, "object": "model", "created": CREATED, "owned_by": "fake"} for i in ids]
        return web.json_response({"object": "list", "data": data})

    async def speech(self, request: web.Request) -> web.StreamResponse:
        """An OpenAI-compatible /audio/speech: raw PCM16 at 24 kHz, 50 ms a character of
        input, written in pieces as a real one streams; voice "fail" is a 400."""
        body = await request.json()
        self.speech_requests.append({**body, "authorization": request.headers.get("Authorization")})
        if body.get("voice") == "fail":
            error = {
                "message": "unknown voice 'fail' for sk-abcdef123456",
                "type": "invalid_request_error",
            }
            return web.json_response({"error": error}, status=400)
        resp = web.StreamResponse(headers={"Content-Type": "audio/pcm"})
        await resp.prepare(request)
        pcm = tone(0.05 * len(body.get("input", "")))
        self.speech_open += 1
        try:
            for i in range(0, len(pcm), 4800):
                await resp.write(pcm[i : i + 4800])
                await asyncio.sleep(0.005 if body.get("voice") != "slow" else 0.5)
        finally:
            self.speech_open -= 1
        await resp.write_eof()
        return resp

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.open_streams += 1
        try:
            resp = await self.answer(request)
            self.finished += 1
            return resp
        except asyncio.CancelledError:  # llmgate closed the connection
            self.cancelled += 1
            raise
        finally:
            self.open_streams -= 1

    async def answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        model = body.get("model", "")
        if self.fail_with is not None:
            return self.status(self.fail_with)
        status = model.removeprefix("status-")
        if status != model:
            return self.status(int(status))
        if model == "slow-headers":
            await asyncio.sleep(30)
        if model == "reset-at-once":  # a TCP reset instead of an answer
            reset(request)
            await asyncio.sleep(3600)
        if model == "html":  # a proxy's page, or a wrong base_url
            return web.Response(body=b"<html>hello</html>", content_type="text/html")
        if model in ("json-cut", "json-reset"):  # JSON to a stream request, cut off mid-body
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = 1000
            await resp.prepare(request)
            await resp.write(b'{"id": "chatcmpl-fake", "choi')
            await asyncio.sleep(0.05)
            if model == "json-reset":
                reset(request)
            assert request.transport is not None
            request.transport.abort()
            return resp
        if not body.get("stream") and model in ("error-mid", "truncated"):
            return await self.failed_answer(request, model)
        if not body.get("stream") or model in ("json-when-streamed", "error-200"):
            return self.complete(model)
        return await self.stream(request, model, body)

    def status(self, status: int) -> web.Response:
        error = {
            "message": f"fake error {status}",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "fake_code",
        }
        headers = {}
        if status == 429:
            headers["Retry-After"] = "7"
        if status == 401:
            error["message"] = "Incorrect API key provided: sk-proj-abcdef1234"
        return web.json_response({"error": error}, status=status, headers=headers)

    async def failed_answer(self, request: web.Request, model: str) -> web.StreamResponse:
        """A non-streamed answer of a model that fails mid-way, as a provider sends it: an
        error status (error-mid), or a body cut off (truncated)."""
        if model == "error-mid":
            error = {"message": "overloaded", "type": "server_error", "code": None}
            return web.json_response({"error": error}, status=500)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 1000
        await resp.prepare(request)
        await resp.write(b'{"id": "chatcmpl-fake", "choi')
        assert request.transport is not None
        request.transport.abort()
        return resp

    def complete(self, model: str) -> web.Response:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(WORDS)}
        finish = "stop"
        if model == "tools":  # what the streamed deltas add up to
            message = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_abc", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ]}
            finish = "tool_calls"
        if model == "error-200":
            return web.json_response({"error": {"message": "quota exceeded for sk-abcdef123"}})
        if model == "garbage":
            return web.Response(body=b"<html>oops</html>", content_type="application/json")
        return web.json_response(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": CREATED,
                "model": model,
                "choices": [
                    {"index": 0, "finish_reason": finish, "logprobs": None, "message": message}
                ],
                "usage": USAGE,
            }
        )

    async def stream(self, request: web.Request, model: str, body: dict) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        eol = {"crlf": b"\r\n", "cr": b"\r"}.get(model, b"\n")
        frames = [frame(c, eol) for c in self.script(model, body)]
        if model in (
            "no-done", "truncated", "error-mid", "garbage", "stall-mid", "drop", "reset",
            "speak-then-stall", "stall-after-finish",
        ):
            pass
        else:
            frames.append(frame(b"[DONE]", eol))
        if model == "stall":
            await asyncio.sleep(3600)
        if model == "slow-first":  # headers at once, the first token 300 ms later
            await asyncio.sleep(0.3)
        if model == "slow-first-2s":  # a model that thinks for 2 s before its first token
            await asyncio.sleep(2)
        while model == "pings":  # alive, but never a token
            await resp.write(b": keep-alive\n\n")
            await asyncio.sleep(0.02)
        if model == "split":
            raw = b"".join(frames)
            for i in range(0, len(raw), 3):
                await resp.write(raw[i : i + 3])
                await asyncio.sleep(0)
        elif model == "slow-words":  # a chunk every 100 ms: an answer that takes a while
            for f in frames:
                await resp.write(f)
                await asyncio.sleep(0.1)
        elif model == "done-no-finish":  # everything in one write: one read for llmgate
            await resp.write(b"".join(frames))
        elif model == "comments":
            await resp.write(b": keep-alive\n\nevent: message\nid: 1\nretry: 10\n")
            # The first chunk as a payload over two `data:` lines, split between JSON tokens.
            first = json.dumps(chunk(model, {"role": "assistant", "content": ""})).encode()
            cut = first.index(b", ") + 1
            await resp.write(b"data: " + first[:cut])
            await resp.write(b"\ndata:" + first[cut:] + b"\n\n")
            for f in frames[1:]:
                await resp.write(f)
        elif model in ("error-mid", "garbage"):  # the failure in a read of its own, later
            for f in frames[:-1]:
                await resp.write(f)
            await asyncio.sleep(0.05)
            await resp.write(frames[-1])
        elif model == "truncated":  # the end in a read of its own, later
            for f in frames:
                await resp.write(f)
            await asyncio.sleep(0.05)
        else:
            for f in frames:
                await resp.write(f)
        if model in ("stall-mid", "speak-then-stall", "stall-after-finish"):
            await asyncio.sleep(3600)
        if model == "reset":
            reset(request)
        if model == "drop":
            assert request.transport is not None
            request.transport.abort()
        await resp.write_eof()
        return resp

    def script(self, model: str, body: dict) -> list[Any]:
        if model == "flood":  # more than socket buffers hold, as fast as it goes
            filler = "x" * 4000
            return [chunk(model, {"content": filler}) for _ in range(5000)] + [
                chunk(model, {}, "stop")
            ]
        if model == "tools":
            return [chunk(model, d) for d in TOOL_CALL_DELTAS] + [chunk(model, {}, "tool_calls")]
        if model == "audio":
            return audio_chunks(model)
        if model.startswith("use-tools-"):
            return tool_round(model, body)
        if model in ("truncated", "stall-mid", "drop", "reset"):
            return text_chunks(model, WORDS)[:2]
        if model == "done-no-finish":
            return text_chunks(model, WORDS)[:-1]
        if model == "speak-then-stall":  # sentences to speak, then silence: a barge-in test
            return text_chunks(model, ["A first sentence is here. ", "And a second one. "] * 5)[:-1]
        if model == "finish-with-content":  # Gemini: the last text and the finish together
            chunks = text_chunks(model, ["**Hi", " there**"])
            chunks[-2]["choices"][0]["finish_reason"] = "stop"
            return chunks[:-1]
        if model == "error-mid":
            error = {"error": {"message": "overloaded", "type": "server_error", "code": None}}
            return [*text_chunks(model, WORDS)[:2], error]
        if model == "garbage":
            return [*text_chunks(model, WORDS)[:2], b"this is not json"]
        if model == "content-parts":  # a provider's own shape of content: passed on as it is
            parts = [{"type": "text", "text": "**hi**"}]
            return [chunk(model, {"role": "assistant", "content": parts}), chunk(model, {}, "stop")]
        chunks = text_chunks(model, MARKDOWN if model == "markdown" else WORDS)
        if model == "markdown":
            for c in chunks:  # fields a stage must keep as they came
                c["system_fingerprint"] = "fp_fake"
                c["x_vendor"] = {"queue_ms": 3}
        if model == "azure":
            first = {
                "id": "",
                "object": "",
                "created": 0,
                "model": "",
                "choices": [],
                "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
            }
            chunks.insert(0, first)
        if (body.get("stream_options") or {}).get("include_usage"):
            for c in chunks:
                c["usage"] = None
            chunks.append({**chunk(model, {}), "choices": [], "usage": USAGE})
        return chunks
