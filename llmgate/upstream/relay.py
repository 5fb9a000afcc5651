"""The plain route's frame relay: upstream SSE bytes in, the caller's bytes out, peeked.

Two paths give the same bytes. The common read, whole `data: <json>\\n\\n` frames and
nothing else, is recognised with a few bytes operations, validated by one msgspec call over
all its payloads, and passed on as it came. Anything else (CR line ends, a frame split
across reads, comments, `event:` fields, multi-line data, a bad or error frame) goes event
by event through SSEDecoder. Either way every payload is decoded once into a small peek
(finish_reason, usage, error): that is what tells a garbage frame from a chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from llmgate.errors import ApiError, UpstreamUnavailable
from llmgate.protocol import ChunkPeek, ChunkView, chunk_decoder
from llmgate.sse import DONE, DONE_FRAME, SSEDecoder
from llmgate.upstream.provider import Provider

_DONE_TAIL = len(DONE_FRAME)
_peeks_decoder = msgspec.json.Decoder(list[ChunkPeek])


class Tally:
    """What one upstream answer came to: its chunks, its last finish_reason and usage.

    The last usage seen stands: some providers repeat a running total in every chunk.
    """

    __slots__ = ("chunks", "finish_reason", "usage")

    def __init__(self) -> None:
        self.chunks = 0
        self.finish_reason: str | None = None
        self.usage: dict | None = None

    def note(self, peeks: Sequence[ChunkPeek | ChunkView]) -> None:
        self.chunks += len(peeks)
        for peek in peeks:
            for choice in peek.choices:
                if choice.finish_reason:
                    self.finish_reason = choice.finish_reason
            if peek.usage:
                self.usage = peek.usage


class Relay:
    """Feed it upstream reads; it returns what to send and keeps the turn's peeks.

    After a read, `done` says `[DONE]` came (it is not in the output: the writer adds its
    own), and `failure` holds the error to report once the returned bytes are sent. A
    provider's error frame is never passed on as it came: it is the failure
    (`Provider.frame_error`), said by the writer as on every other path.
    """

    __slots__ = ("_decoder", "_provider", "done", "failure", "tally")

    def __init__(self, provider: Provider) -> None:
        self._decoder = SSEDecoder()
        self._provider = provider
        self.done = False
        self.failure: ApiError | None = None
        self.tally = Tally()

    def take_failure(self) -> ApiError:
        """The failure, no longer kept here: raised from a frame that holds this relay, a
        failure kept on it would make a reference cycle through its traceback."""
        failure, self.failure = self.failure, None
        assert failure is not None
        return failure

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
                # msgspec skips the fields a peek does not name without checking them:
                # invalid UTF-8 is refused here, as the staged routes' full decode does.
                data.decode()
                peeks = _peeks_decoder.decode(b"[" + b",".join(payloads) + b"]")
            except (msgspec.DecodeError, UnicodeDecodeError):
                return None  # the event path finds the bad frame and sends what came before
            # One value per payload, else a payload held two values or none.
            if len(peeks) != len(payloads) or any(p.error is not None for p in peeks):
                return None
            self.tally.note(peeks)
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
                payload.decode()  # (see _whole_frames)
                peek = chunk_decoder.decode(payload)
            except (msgspec.DecodeError, UnicodeDecodeError):
                self.failure = UpstreamUnavailable(
                    f"provider '{self._provider.name}' sent a malformed chunk"
                )
                break
            if peek.error is not None:
                self.failure = self._provider.frame_error(payload)
                break
            out.append(event.frame())
            self.tally.note((peek,))
        return b"".join(out)
