"""The playground's live view: every turn as it ends, with its clock, as Server-Sent Events.

    GET /playground/events   (with `[playground] enabled = true`)

A feed llmgate originates itself, for a handful of operator connections: written with
aiohttp-sse (its ping task per connection costs nothing at that count). Each event is one
turn's clock (llmgate.obs.clock) with its route, status, model, provider and channel, never
message text or a key. Served to loopback callers only unless `allow_remote` is set, and to
a caller key, sent as a bearer like any client's. A subscriber that cannot keep up loses
events (each has a bounded queue), never slows a turn.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp_sse import sse_response

from llmgate.config import Config, PlaygroundConfig, is_loopback
from llmgate.errors import ApiError
from llmgate.server.feed import FEED
from llmgate.server.handlers import Settings


class Events:
    """GET /playground/events."""

    def __init__(self, config: PlaygroundConfig, keys: Any) -> None:
        self.config = config
        self.keys = keys

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not self.config.allow_remote and not is_loopback(request.remote or ""):
            raise ApiError(403, "the playground is served to loopback callers only; set "
                                "[playground] allow_remote = true")
        self.keys(request)  # a caller key, as for any request
        feed = request.app[FEED]
        queue = feed.subscribe()
        try:
            async with sse_response(request) as resp:
                while resp.is_connected():
                    await resp.send(await queue.get(), event="turn")
        finally:
            feed.unsubscribe(queue)
        return resp


def routes(config: Config, settings: Settings) -> dict[str, tuple[str, Any]]:
    """The playground's paths (app.Generation adds them when it is enabled)."""
    events = Events(config.playground, settings.keys)
    return {"/playground/events": ("GET", events.handle)}
