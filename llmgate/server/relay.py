"""The plain route's frame relay: upstream SSE bytes in, the caller's bytes out, peeked.

Two paths give the same bytes. The common read, whole `data: <json>\\n\\n` frames and
nothing else, is recognised with a few bytes operations, validated by one msgspec call over
all its payloads, and passed on as it came. Anything else (CR line ends, a frame split
across reads, comments, `event:` fields, multi-line data, a bad or error frame) goes event
by event through SSEDecoder. Either way every payload is decoded once into a small peek
(finish_reason, usage, error): that is what tells a garbage frame from a chunk.
"""

from __future__ import annotations

import msgspec

from llmgate.errors import ApiError, UpstreamUnavailable
from llmgate.protocol import ChunkPeek, chunk_decoder
from llmgate.sse import DONE, DONE_FRAME, SSEDecoder
from llmgate.turn import Turn

_DONE_TAIL = len(DONE_FRAME)
_peeks_decoder = msgspec.json.Decoder(list[ChunkPeek])


class UpstreamErrorFrame(ApiError):
    """The provider sent `{"error": ...}` mid-stream; it has been relayed as it came."""

    def __init__(self) -> None:
        super().__init__(502, "provider sent an error frame")


class Relay:
    """Feed it upstream reads; it returns what to send and keeps the turn's peeks.

    After a read, `done` says `[DONE]` came (it is not in the output: the writer adds its
    own), and `failure` holds the error to report once the returned bytes are sent.
    """

    __slots__ = ("_decoder", "_provider", "_turn", "done", "failure")

    def __init__(self, turn: Turn, provider: str) -> None:
        self._decoder = SSEDecoder()
        self._turn = turn
        self._provider = provider
        self.done = False
        self.failure: ApiError | None = None

    def feed(self, data: bytes) -> bytes:
        if self._decoder.idle:
            out = self._whole_frames(data)
            if out is not None:
                return out
        return self._events(data)

    def _whole_frames(self, data: bytes) -> bytes | None:
        """The fast path, or None where a read is anything but whole one-line data frames."""
        if data[-2:] != b"\n\n" or data[:6] != b"data: " or b"\r" in data:
            return None
        frames = data[:-2].split(b"\n\n")
        if data.count(b"\n") != 2 * len(frames):
            return None  # a frame with more than one line
        payloads = [f[6:] for f in frames if f[:6] == b"data: "]
        if len(payloads) != len(frames):
            return None
        done = payloads[-1] == DONE
        if done:
            payloads.pop()
            data = data[:-_DONE_TAIL]
        if DONE in payloads:
            return None
        if payloads:
            try:
                peeks = _peeks_decoder.decode(b"[" + b",".join(payloads) + b"]")
            except msgspec.DecodeError:
                return None  # the event path finds the bad frame and sends what came before
            # One value per payload, else a payload held two values or none.
            if len(peeks) != len(payloads) or any(p.error is not None for p in peeks):
                return None
            self._note(peeks)
        self.done = done
        return data

    def _events(self, data: bytes) -> bytes:
        out: list[bytes] = []
        for event in self._decoder.feed(data):
            payload = event.data
            if payload == DONE:
                self.done = True
                break
            try:
                peek = chunk_decoder.decode(payload)
            except msgspec.DecodeError:
                self.failure = UpstreamUnavailable(
                    f"provider '{self._provider}' sent a malformed chunk"
                )
                break
            out.append(event.frame())
            if peek.error is not None:
                self.failure = UpstreamErrorFrame()
                break
            self._note((peek,))
        return b"".join(out)

    def _note(self, peeks: list[ChunkPeek] | tuple[ChunkPeek, ...]) -> None:
        turn = self._turn
        turn.chunks += len(peeks)
        for peek in peeks:
            for choice in peek.choices:
                if choice.finish_reason:
                    turn.finish_reason = choice.finish_reason
            if peek.usage:
                turn.usage = peek.usage
