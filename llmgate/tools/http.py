"""A tool that is an HTTP endpoint of the operator's: the arguments go as JSON (or as query
parameters for GET), the answer's body is the result (JSON or text, bounded).

Failures are told to the model in a few words (the status, "timed out", "could not be
reached"), never with the URL (it may carry a key) or the service's own error text beyond
the bounded body of a 2xx. A cancelled call (a barge-in) closes the request.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec

from llmgate.config import ToolConfig
from llmgate.kb.service import OwnSession
from llmgate.tools.base import MAX_RESULT, ToolError, ToolSpec, bounded
from llmgate.upstream.client import read_bounded

_MAX_BODY = 4 * MAX_RESULT  # bytes read of an answer (UTF-8 is at most 4 bytes a character)


class HttpTool:
    def __init__(self, name: str, config: ToolConfig) -> None:
        self.spec = ToolSpec(name, config.description, config.parameters)
        self.config = config
        self.timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self._client = OwnSession()

    async def start(self) -> None:
        pass  # the client opens on the first call

    async def aclose(self) -> None:
        await self._client.aclose()

    async def call(self, arguments: dict[str, Any], headers: dict[str, str]) -> str:
        name, config = self.spec.name, self.config
        send: dict[str, Any] = {"headers": {**config.headers, **headers}}
        if config.method == "GET":
            send["params"] = {
                k: v if isinstance(v, str) else msgspec.json.encode(v).decode()
                for k, v in arguments.items()
            }
        else:
            send["data"] = msgspec.json.encode(arguments)
            send["headers"]["Content-Type"] = "application/json"
        try:
            async with self._client.get().request(
                config.method, config.url, timeout=self.timeout, **send
            ) as resp:
                if not 200 <= resp.status < 300:
                    raise ToolError(f"tool {name} answered HTTP {resp.status}")
                raw = await read_bounded(resp.content, _MAX_BODY)
                is_json = resp.content_type == "application/json"
        except TimeoutError:
            raise ToolError(f"tool {name} timed out after {config.timeout_s:g} s") from None
        except (aiohttp.ClientError, OSError):
            raise ToolError(f"tool {name} could not be reached") from None
        text = raw.decode("utf-8", errors="replace")
        if is_json:
            try:
                msgspec.json.decode(raw)
            except msgspec.DecodeError:
                if len(raw) < _MAX_BODY:  # not merely cut at the bound
                    raise ToolError(f"tool {name} answered JSON that does not parse") from None
        return bounded(text)
