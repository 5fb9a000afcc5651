"""Log lines to stderr (journald under systemd), as text or JSON, one line per record.

A record's exception is shown by its class name only: a traceback or an exception's text
can carry internals or secrets, and neither belongs in a log line.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec

_encode = msgspec.json.Encoder().encode


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
            line["msg"] = record.getMessage()
            line.update(fields)
            if record.exc_info and record.exc_info[0]:
                line["exc"] = record.exc_info[0].__name__
            return _encode(line).decode()
        parts = [ts, record.levelname.lower(), record.getMessage()]
        parts += [f"{k}={_text(v)}" for k, v in fields.items()]
        if record.exc_info and record.exc_info[0]:
            parts.append(f"exc={record.exc_info[0].__name__}")
        return " ".join(parts)


def _text(value: Any) -> str:
    if isinstance(value, str) and value and " " not in value and '"' not in value:
        return value
    return _encode(value).decode()


def setup(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
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
