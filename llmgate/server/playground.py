"""The playground: a page to talk to any route, and the live view of every turn.

    GET /playground                     the page (static: it needs no key)
    GET /playground/static/{file}       its stylesheet and script (an allow-list of files)
    GET /playground/routes              every route and its stages (a caller key)
    GET /playground/events              every turn as it ends, with its clock (a caller key)

All of it only with `[playground] enabled = true`, and to loopback callers only unless
`allow_remote` is set. The page's files ship in the package (llmgate/playground/) and are
read once, when the config is; they are sent with a Content-Security-Policy that allows no
inline script or style and nothing from another origin.

The live feed is one llmgate originates itself, for a handful of operator connections:
written with aiohttp-sse (its ping task per connection costs nothing at that count). Each
event is one turn's clock (llmgate.obs.clock) with its route, status, model, provider and
channel, never message text or a key. A subscriber that cannot keep up loses events (each
has a bounded queue), never slows a turn.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from aiohttp import web
from aiohttp_sse import sse_response

from llmgate.config import Config, PlaygroundConfig, RouteConfig, is_loopback, kind_of
from llmgate.errors import ApiError
from llmgate.server.feed import FEED
from llmgate.server.handlers import Settings

PAGE = "index.html"
# the files the page may load, and nothing else: a name not here is a 404
FILES = {
    "index.html": "text/html; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
}
STATIC = "/playground/static/"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; media-src 'self' blob:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}


def local_only(config: PlaygroundConfig, request: web.Request) -> None:
    """Every playground path: loopback callers only, unless `allow_remote` is set."""
    if not config.allow_remote and not is_loopback(request.remote or ""):
        raise ApiError(403, "the playground is served to loopback callers only; set "
                            "[playground] allow_remote = true")


class Files:
    """GET /playground and its static files: bytes read once, at construction."""

    def __init__(self, config: PlaygroundConfig) -> None:
        self.config = config
        folder = resources.files("llmgate") / "playground"
        self.files = {name: (folder / name).read_bytes() for name in FILES}

    def handler(self, name: str):
        body, content_type = self.files[name], FILES[name]

        async def handle(request: web.Request) -> web.StreamResponse:
            local_only(self.config, request)
            return web.Response(body=body, headers={**HEADERS, "Content-Type": content_type})

        return handle


class Routes:
    """GET /playground/routes: every chat route with the stages it has, and the model list."""

    def __init__(self, config: Config, keys: Any) -> None:
        self.config = config.playground
        self.keys = keys
        self.body = [_route(route, config) for route in config.routes] + [
            {"kind": "models", "method": "GET", "path": path} for path in ("/v1/models", "/models")
        ]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        local_only(self.config, request)
        self.keys(request)  # a caller key, as for any request
        return web.json_response(self.body, headers={"Cache-Control": "no-store"})


class Events:
    """GET /playground/events."""

    def __init__(self, config: PlaygroundConfig, keys: Any) -> None:
        self.config = config
        self.keys = keys

    async def handle(self, request: web.Request) -> web.StreamResponse:
        local_only(self.config, request)
        self.keys(request)  # a caller key, as for any request
        feed = request.app[FEED]
        queue = feed.subscribe()
        try:
            async with sse_response(request) as resp:
                while resp.is_connected():
                    event = await queue.get()
                    if event is None:  # shutting down (Feed.close)
                        break
                    await resp.send(event, event="turn")
        finally:
            feed.unsubscribe(queue)
        return resp


def _route(route: RouteConfig, config: Config) -> dict[str, Any]:
    """A route as the page shows it: its paths (as configured and under /v1, as app.py
    serves it), its stages, and what llmgate itself may say on it (to mark it so)."""
    path = route.path
    v1 = path.removeprefix("/v1") if path.startswith("/v1/") else "/v1" + path
    audio = None
    if route.audio is not None:
        section = config.audio[route.audio]
        audio = {"name": route.audio, "engine": kind_of(section),
                 "sample_rate": section.sample_rate}
    said: dict[str, list[str]] = {"waiting": [], "filler": [], "apology": []}
    if route.rag is not None:
        said["waiting"] = list(config.rag[route.rag].waiting.phrases)
    if route.tools and route.tool_filler is not None:
        said["filler"] = list(route.tool_filler.phrases)
    server = config.server
    if server.on_stream_error == "apology" and server.apology:
        said["apology"] = [server.apology]
    return {
        "kind": "chat",
        "method": "POST",
        "path": path,
        "paths": [path, v1],
        "stages": {
            "rag": route.rag,
            "audio": audio,
            "tools": list(route.tools),
            "speech": bool(route.speech) or route.audio is not None,
        },
        "phrases": said,
    }


def routes(config: Config, settings: Settings) -> dict[str, tuple[str, Any]]:
    """The playground's paths (app.Generation adds them when it is enabled)."""
    files = Files(config.playground)
    table: dict[str, tuple[str, Any]] = {"/playground": ("GET", files.handler(PAGE))}
    for name in FILES:
        if name != PAGE:
            table[STATIC + name] = ("GET", files.handler(name))
    table["/playground/routes"] = ("GET", Routes(config, settings.keys).handle)
    table["/playground/events"] = ("GET", Events(config.playground, settings.keys).handle)
    return table
