"""Log lines to stderr (journald under systemd), as text or JSON, one line per record.

A record's exception is shown by its class name only: a traceback or an exception's text
can carry internals or secrets, and neither belongs in a log line. A line cannot be forged:
every control character in a message or a value is escaped (a caller's `model` with a
newline stays on its line) and a long value is clipped to MAX_VALUE characters.

Info lines written from the event loop are gathered for up to FLUSH_S and written together:
one write per turn cost ~50 us of CPU on this VM, 8% of a 20-chunk stream. Warnings and
errors, and anything logged off the loop, are written at once; exit flushes the rest.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from typing import Any

import msgspec

_encode = msgspec.json.Encoder().encode
FLUSH_S = 0.05
MAX_VALUE = 512  # characters of one string value
# what JSON leaves raw but a terminal or a log reader may act on (C1 controls, DEL, the
# Unicode line and paragraph separators)
_BIDI = "\u200e\u200f\u202a-\u202e\u2066-\u2069"  # marks that reorder a line on screen
_UNSAFE = re.compile(f"[\x7f-\x9f\u2028\u2029{_BIDI}]")
_CONTROL = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029{_BIDI}]")


class _BatchingHandler(logging.StreamHandler):
    """A StreamHandler that writes the loop's info lines in batches."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            loop = asyncio.get_running_loop() if record.levelno < logging.WARNING else None
        except RuntimeError:  # no loop in this thread: write through
            loop = None
        except Exception:
            self.handleError(record)
            return
        self._lines.append(line)
        if loop is None:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            self._scheduled = False
            if self._lines:
                text, self._lines = "".join(self._lines), []
                self.stream.write(text)
            super().flush()
        finally:
            self.release()


class _Formatter(logging.Formatter):
    def __init__(self, json: bool) -> None:
        super().__init__()
        self.json = json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "turn", None) or {}
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ts += f".{int(record.msecs):03d}Z"
        if self.json:
            line: dict[str, Any] = {"ts": ts, "level": record.levelname.lower()}
            line["msg"] = _clip(record.getMessage())
            line.update({k: _clip(v) for k, v in fields.items()})
            if record.exc_info and record.exc_info[0]:
                line["exc"] = record.exc_info[0].__name__
            return _escaped(_encode(line).decode())
        parts = [ts, record.levelname.lower(), _message(record.getMessage())]
        parts += [f"{k}={_text(v)}" for k, v in fields.items()]
        if record.exc_info and record.exc_info[0]:
            parts.append(f"exc={record.exc_info[0].__name__}")
        return " ".join(parts)


def _text(value: Any) -> str:
    if type(value) is str:
        if (
            value
            and len(value) <= MAX_VALUE
            and value.isascii()
            and value.isprintable()  # (no control character, DEL included)
            and " " not in value
            and '"' not in value
        ):
            return value
        value = _clip(value)
    return _escaped(_encode(value).decode())


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_VALUE:
        return f"{value[:MAX_VALUE]}... ({len(value)} chars)"
    return value


def _escaped(text: str) -> str:
    """JSON text with what JSON leaves raw (DEL, C1 controls, U+2028/9) escaped too."""
    if text.isascii() and "\x7f" not in text:
        return text
    return _UNSAFE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _message(text: str) -> str:
    """A message on one line: its control characters as escapes, clipped."""
    if not text.isprintable():  # (control characters, U+2028/9 among what is not)
        text = _CONTROL.sub(_escape, text)
    return _clip(text)


def setup(fmt: str = "text", level: str = "info") -> None:
    handler = _BatchingHandler(sys.stderr)
    handler.setFormatter(_Formatter(json=fmt == "json"))
    ours = logging.getLogger("llmgate")
    ours.handlers[:] = [handler]
    ours.setLevel(level.upper())
    ours.propagate = False
    # Everyone else's warnings (aiohttp, asyncio's "Task exception was never retrieved")
    # go through the same formatter, so no library prints a traceback either. aiohttp's
    # access log would repeat what the turn line says.
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # The MCP SDK's HTTP client logs each request's full URL (query and all) at INFO: never,
    # whatever level the rest is set to.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
