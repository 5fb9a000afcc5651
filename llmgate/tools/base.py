"""What a server-side tool is: a spec the model sees, and a call that gives it a result.

A tool's failure (bad arguments, an error, a timeout, garbage) is a ToolError whose message
is short and safe to show the model: the turn goes on with it as the tool's result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

MAX_RESULT = 16 * 1024  # characters of a result the model gets; the rest is cut


class ToolError(Exception):
    """A tool call that failed; the message is what the model is told."""


@dataclass(frozen=True)
class ToolSpec:
    name: str  # the tool's own name (an MCP server's, or the [tools.NAME] key)
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    server: str = ""  # an MCP tool's [tools.NAME]: a bounded name for logs and metrics


class Tool(Protocol):
    spec: ToolSpec

    async def call(self, arguments: dict[str, Any], headers: dict[str, str]) -> str:
        """The result as text for the model (at most MAX_RESULT characters); ToolError if
        it failed. `headers` are the turn's metadata the tool is configured to pass on.
        Cancelling the call (a barge-in) stops the work: its request is closed."""
        ...


def bounded(text: str) -> str:
    if len(text) <= MAX_RESULT:
        return text
    return text[:MAX_RESULT] + " [result cut]"
