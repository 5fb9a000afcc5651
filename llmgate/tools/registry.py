"""Every [tools.NAME] of the config, started once with the app, and the tools a route offers.

An http section is one tool named after its section; an mcp section is a server whose tools
are listed at start-up and again when they change, capped (a server that is down is retried
in the background: its tools are missing until then). Names sent to the model are valid
OpenAI function names (`^[A-Za-z0-9_-]{1,64}$`) and unique on the route.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from llmgate.config import HttpToolConfig, ToolConfig
from llmgate.tools.base import Tool
from llmgate.tools.http import HttpTool

if TYPE_CHECKING:
    from llmgate.tools.mcp import McpServer

_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9_-]")


class Toolbox:
    def __init__(self, configs: dict[str, ToolConfig]) -> None:
        self.http: dict[str, HttpTool] = {}
        self.mcp: dict[str, McpServer] = {}
        for name, config in configs.items():
            if isinstance(config, HttpToolConfig):
                self.http[name] = HttpTool(name, config)
            else:  # McpToolConfig
                from llmgate.tools.mcp import McpServer  # the mcp SDK: only when one is used

                self.mcp[name] = McpServer(
                    name,
                    config.url,
                    config.headers,
                    config.allowed,
                    config.timeout_s,
                    max_tools=config.max_tools,
                    max_description_chars=config.max_description_chars,
                    max_schema_bytes=config.max_schema_bytes,
                )
        self.configs = configs

    async def start(self) -> None:
        for tool in self.http.values():
            await tool.start()
        for server in self.mcp.values():
            await server.start()  # never raises: a server that is down is retried later

    async def aclose(self) -> None:
        for tool in self.http.values():
            await tool.aclose()
        for server in self.mcp.values():
            await server.aclose()

    def offered(self, sections: list[str]) -> dict[str, tuple[Tool, dict[str, str]]]:
        """The route's tools as the model sees them now: function name -> (tool, which
        turn metadata goes in which header)."""
        out: dict[str, tuple[Tool, dict[str, str]]] = {}
        for section in sections:
            config = self.configs[section]
            found: list[Tool] = (
                [self.http[section]] if section in self.http else list(self.mcp[section].tools())
            )
            for tool in found:
                out[function_name(tool.spec.name, out)] = (tool, config.metadata)
        return out


def function_name(raw: str, taken: dict[str, Any]) -> str:
    """`raw` as an OpenAI function name, not one of `taken`."""
    base = _NOT_ALLOWED.sub("_", raw)[:64] or "tool"
    name, n = base, 1
    while name in taken:
        n += 1
        suffix = f"_{n}"
        name = base[: 64 - len(suffix)] + suffix
    return name
