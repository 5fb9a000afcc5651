"""A tool that is an HTTP endpoint of the operator's: the arguments go as JSON (or as query
parameters for GET), the answer's body is the result (JSON or text, bounded).

Failures are told to the model in a few words (the status, "timed out", "could not be
reached"), never with the URL (it may carry a key) or the service's own error text beyond
the bounded body of a 2xx. A redirect is not followed (it is a failure: the tool's headers
would go to another host). A cancelled call (a barge-in) closes the request.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import aiohttp
import msgspec

from llmgate import http
from llmgate.config import HttpToolConfig
from llmgate.tools.base import MAX_RESULT, ToolError, ToolSpec, bounded

log = logging.getLogger("llmgate.tools")

_MAX_BODY = 4 * MAX_RESULT  # bytes read of an answer (UTF-8 is at most 4 bytes a character)
# What no header may hold (RFC 9110 5.5; aiohttp refuses to send it): tab is allowed.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class HttpTool:
    def __init__(self, name: str, config: HttpToolConfig) -> None:
        self.spec = ToolSpec(name, config.description, config.parameters)
        self.config = config
        self.timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self._client = http.OwnSession()

    async def start(self) -> None:
        pass  # the client opens on the first call

    async def aclose(self) -> None:
        await self._client.aclose()

    async def call(self, arguments: dict[str, Any], headers: dict[str, str]) -> str:
        name, config = self.spec.name, self.config
        send: dict[str, Any] = {"headers": {**config.headers, **self._sendable(headers)}}
        if config.method == "GET":
            send["params"] = {
                k: v if isinstance(v, str) else msgspec.json.encode(v).decode()
                for k, v in arguments.items()
            }
        else:
            send["data"] = msgspec.json.encode(arguments)
            send["headers"]["Content-Type"] = "application/json"
        try:
            async with http.request(
                self._client.get(), config.method, config.url, timeout=self.timeout, **send
            ) as resp:
                raw = await http.read(resp, _MAX_BODY, cut=True)
                is_json = resp.content_type == "application/json"
        except http.TimedOut:
            raise ToolError(f"tool {name} timed out after {config.timeout_s:g} s") from None
        except http.HttpError as exc:
            raise ToolError(f"tool {name} {exc}") from None
        text = raw.decode("utf-8", errors="replace")
        if is_json:
            try:
                msgspec.json.decode(raw)
            except msgspec.DecodeError:
                if len(raw) < _MAX_BODY:  # not merely cut at the bound
                    raise ToolError(f"tool {name} answered JSON that does not parse") from None
        return bounded(text)

    def _sendable(self, headers: dict[str, str]) -> dict[str, str]:
        """The turn's metadata headers that can be sent: one with a control character is
        left out (said by its name, never its value) and the tool is called without it."""
        out = {}
        for header, value in headers.items():
            if _CONTROL.search(header) or _CONTROL.search(value):
                log.warning(
                    "tool %s: header %s left out (a control character in its value)",
                    self.spec.name, ascii(header),
                )
            else:
                out[header] = value
        return out
