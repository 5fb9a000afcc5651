"""One request's life: its id, what it asked for, how it went, and its one log line."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger("llmgate.turn")

CLIENT_CLOSED = 499


class Turn:
    __slots__ = (
        "chunks",
        "error",
        "finish_reason",
        "first_token",
        "id",
        "metadata",
        "model",
        "provider",
        "route",
        "started",
        "status",
        "stream",
        "usage",
    )

    def __init__(self, route: str) -> None:
        self.id = "req_" + os.urandom(12).hex()
        self.route = route
        self.started = time.perf_counter()
        self.model: str | None = None
        self.provider: str | None = None
        self.stream = False
        self.status = 200
        self.first_token: float | None = None
        self.chunks = 0
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.metadata: dict[str, Any] = {}

    def mark_first_token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter() - self.started

    def fields(self) -> dict[str, Any]:
        """The log line's fields. Never message text, never a key."""
        out: dict[str, Any] = {
            "request_id": self.id,
            "route": self.route,
            "model": self.model,
            "provider": self.provider,
            "stream": self.stream,
            "status": self.status,
            "ttft_ms": _ms(self.first_token),
            "duration_ms": _ms(time.perf_counter() - self.started),
            "chunks": self.chunks,
        }
        if self.finish_reason:
            out["finish_reason"] = self.finish_reason
        if self.usage:
            out["usage"] = {
                k: v for k, v in self.usage.items() if k.endswith("_tokens") and type(v) is int
            }
        if self.error:
            out["error"] = self.error
        if self.metadata:
            out["metadata"] = self.metadata
        return out

    def log(self) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info("turn", extra={"turn": self.fields()})


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)
