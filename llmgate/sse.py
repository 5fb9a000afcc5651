"""Server-Sent Events as bytes: an incremental decoder (WHATWG rules) and frame encoding.

Two layers, as in httpx-sse: lines are split on CR, LF or CRLF (a CR ending one read and
an LF starting the next are one line end), then a small field state machine builds events.
Everything stays bytes; a UTF-8 character split across reads is never decoded half.
At the end of a stream an unterminated event is dropped, as the spec says.
"""

from __future__ import annotations

DONE = b"[DONE]"
DONE_FRAME = b"data: [DONE]\n\n"
PING_FRAME = b": ping\n\n"
MAX_LINE = 8 * 1024 * 1024


class SSEError(Exception):
    """The byte stream is not SSE we can use (a line, or an event's data, over MAX_LINE)."""


class Event:
    """One dispatched event. `lines` are its `data:` values in order."""

    __slots__ = ("event", "lines")

    def __init__(self, lines: list[bytes], event: bytes) -> None:
        self.lines = lines
        self.event = event

    @property
    def data(self) -> bytes:
        lines = self.lines
        return lines[0] if len(lines) == 1 else b"\n".join(lines)

    def frame(self) -> bytes:
        """The event's data re-framed as `data:` lines, byte for byte."""
        lines = self.lines
        if len(lines) == 1:
            return b"data: " + lines[0] + b"\n\n"
        return b"".join([b"data: " + line + b"\n" for line in lines]) + b"\n"

    def __repr__(self) -> str:
        return f"Event(event={self.event!r}, data={self.data!r})"


class SSEDecoder:
    """Feed it reads as they come; it returns the events each read completed.

    A line still open at the end of a read waits as a list of its pieces, joined once when
    its end arrives: a long line over many small reads costs its length, not its square.
    What one event may hold is bounded like a line: `data:` lines without the blank line
    that ends their event cannot pile up.
    """

    __slots__ = ("_event", "_lines", "_lines_size", "_open", "_open_size", "_skip_lf")

    def __init__(self) -> None:
        self._open: list[bytes] = []  # pieces of the line not yet ended
        self._open_size = 0
        self._skip_lf = False
        self._lines: list[bytes] = []
        self._lines_size = 0
        self._event = b""

    @property
    def idle(self) -> bool:
        """Between events: nothing buffered, so the next read starts on a fresh line."""
        return not (self._open or self._lines or self._skip_lf or self._event)

    def feed(self, chunk: bytes) -> list[Event]:
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            # A CR at the end already ends a line; an LF opening the next read is its pair.
            self._skip_lf = chunk[-1:] == b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\n" not in chunk:
            if chunk:
                self._hold(chunk)
            return []
        if self._open:
            self._open.append(chunk)
            chunk = b"".join(self._open)
            self._open, self._open_size = [], 0
        lines = chunk.split(b"\n")
        tail = lines.pop()
        if tail:
            self._hold(tail)
        return self._fields(lines)

    def _hold(self, piece: bytes) -> None:
        self._open.append(piece)
        self._open_size += len(piece)
        if self._open_size > MAX_LINE:
            raise SSEError(f"an SSE line exceeds {MAX_LINE} bytes")

    def _fields(self, lines: list[bytes]) -> list[Event]:
        events: list[Event] = []
        for line in lines:
            if not line:
                if self._lines:
                    events.append(Event(self._lines, self._event))
                    self._lines = []
                    self._lines_size = 0
                self._event = b""
                continue
            if line[0] == 58:  # b":" starts a comment
                continue
            name, colon, value = line.partition(b":")
            if colon and value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self._lines.append(value)
                self._lines_size += len(value) + 64  # a line costs its bookkeeping too
                if self._lines_size > MAX_LINE:
                    raise SSEError(f"an SSE event exceeds {MAX_LINE} bytes")
            elif name == b"event":
                self._event = value
            # `id:` and `retry:` concern reconnecting clients; a relay has no use for them.
        return events
