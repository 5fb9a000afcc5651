"""create_app(config) -> web.Application: wiring only, and its reload.

What one reading of config.toml serves is a `Generation`: keys, providers and aliases,
routes with their stages, tools, knowledge bases, speech engines. A reload (SIGHUP) builds
and starts a new one and swaps it in; turns already running finish on the one they began
on, which is closed once its last turn has ended. What outlives a reload is app-wide: the
upstream client's pool, the channels (barge-in by turn_id), the limits' counts.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from llmgate.calls import CALLS, Calls, calls_ctx
from llmgate.config import Config, Loaded, RouteConfig, ServerConfig
from llmgate.obs import metrics, tracing
from llmgate.obs.metrics import Names
from llmgate.pipeline import Call, Stage, compose
from llmgate.server.auth import Key, KeyCheck, Rule
from llmgate.server.feed import FEED, Feed
from llmgate.server.handlers import ChatCompletions, MetricsPage, ModelList, Settings, healthz
from llmgate.server.limits import default_global_max
from llmgate.server.middleware import error_envelopes
from llmgate.server.serve import IN_FLIGHT
from llmgate.state import STATE, State, state_ctx, state_for
from llmgate.upstream import catalog
from llmgate.upstream.client import SESSION, client_session
from llmgate.upstream.failover import provider_call
from llmgate.upstream.provider import Provider
from llmgate.upstream.router import Router

if TYPE_CHECKING:
    from llmgate.kb.base import Reader
    from llmgate.tools.registry import Toolbox
    from llmgate.tts.base import Engine

log = logging.getLogger("llmgate")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Generation:
    """What one reading of the config serves, from its start to its last turn's end."""

    def __init__(self, loaded: Loaded, state: State, in_flight: set) -> None:
        config = loaded.config
        self.in_flight = in_flight  # every generation's turns' tasks (server.serve's drain)
        self.loaded = loaded
        max_body = int(config.server.max_body_mb * 2**20)
        providers = {
            name: Provider(name, provider, loaded.unset_env.get(name, ()))
            for name, provider in config.providers.items()
        }
        self.router = Router(providers, config.models, state.board)  # type: ignore[arg-type]
        self.settings = Settings(
            keys=_keys(config.server, self.router),
            limits=state.limits,
            max_body=max_body,
            keepalive_s=config.server.keepalive_s,
            apology=config.server.apology if config.server.on_stream_error == "apology" else None,
            read_timeout_s=config.server.read_timeout_s,
            answer_timeout_s=config.server.answer_timeout_s,
            metrics=_names(config) if config.server.metrics else None,
            playground=config.playground.enabled,
        )
        self.retrievers: dict[str, Reader] = {}
        if any(r.rag for r in config.routes):
            from llmgate.kb import bases

            self.retrievers = {
                name: bases.reader(name, config.kb[name], loaded)
                for name in {config.rag[r.rag].kb for r in config.routes if r.rag}
            }
        # A stage's module (and what it needs: numpy, soxr, jsonschema, piper, mcp) is
        # imported only when a route uses it: a plain relay carries none of them.
        self.engines: dict[str, Engine] = {}
        if any(r.audio for r in config.routes):
            from llmgate.tts.engines import engine_for

            self.engines = {
                name: engine_for(config.audio[name], loaded, providers)
                for name in {r.audio for r in config.routes if r.audio}
            }
        used = {name for r in config.routes for name in r.tools}
        self.toolbox: Toolbox | None = None
        if used:
            from llmgate.tools.registry import Toolbox

            self.toolbox = Toolbox({name: config.tools[name] for name in sorted(used)})
        # path -> (method, handler); each route is also served under /v1
        self.routes: dict[str, tuple[str, Handler]] = {}
        for route in config.routes:
            call = _call(route, config, self.retrievers, self.engines, self.toolbox)
            handler = ChatCompletions(
                route.path, call, self.settings, self.router, _own_phrases(route, config)
            )
            for path in _with_v1(route.path):
                self.routes[path] = ("POST", self._counted(handler.handle))
        models = ModelList(self.settings, self.router)
        for path in _with_v1("/models"):
            self.routes[path] = ("GET", models.handle)
        self.routes["/healthz"] = ("GET", healthz)
        if config.server.metrics:
            self.routes["/metrics"] = ("GET", MetricsPage(config.server.metrics_key).handle)
        if config.playground.enabled:
            from llmgate.server import playground  # (aiohttp-sse: only when on)

            self.routes.update(playground.routes(config, self.settings))
        self.active = 0  # turns running on this generation
        self._retired = False
        self._background: list[asyncio.Task] = []
        self._closing: asyncio.Task | None = None

    async def start(self, session) -> None:
        """Engines readied (piper's voice loaded), MCP servers connected, knowledge bases'
        pools opened, model lists read. An engine that cannot start is logged, and its
        routes answer 503 saying why; a base that cannot is logged, and its routes answer
        "nothing found" until it can."""
        for retriever in self.retrievers.values():
            await retriever.start()
        if self.engines:
            from llmgate.tts.base import EngineError

            for name, engine in self.engines.items():
                try:
                    await engine.start()
                except EngineError as exc:
                    log.error("audio.%s: %s; its routes will answer 503", name, exc)
        if self.toolbox is not None:
            await self.toolbox.start()
        self._background = catalog.keep_fresh(session, self.router)
        if self.settings.metrics is not None:
            for name in self.router.providers:  # circuits start afresh with a config
                metrics.circuit(name, "closed")

    def _counted(self, handle: Handler) -> Handler:
        async def counted(request: web.Request) -> web.StreamResponse:
            self.active += 1
            task = asyncio.current_task()
            self.in_flight.add(task)
            try:
                return await handle(request)
            finally:
                self.active -= 1
                self.in_flight.discard(task)
                if self._retired and self.active == 0:
                    self._close_soon()

        return counted

    def retire(self) -> None:
        """A newer generation serves new turns; this one closes after its last."""
        self._retired = True
        for task in self._background:  # its model lists are no one's now
            task.cancel()
        if self.active == 0:
            self._close_soon()

    def _close_soon(self) -> None:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self.aclose())

    async def aclose(self) -> None:
        await catalog.stop(self._background)
        for retriever in self.retrievers.values():
            await retriever.aclose()
        for engine in self.engines.values():
            await engine.aclose()
        if self.toolbox is not None:
            await self.toolbox.aclose()


class Live:
    """The generation serving new requests."""

    def __init__(self, current: Generation) -> None:
        self.current = current
        self.reloading = asyncio.Lock()

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        # The path as sent, not percent-decoded: `/chat%2Fcompletions` is no route, and
        # `/%6Detrics` is not /metrics behind a proxy that guards `/metrics` alone.
        entry = self.current.routes.get(request.rel_url.raw_path)
        if entry is None:
            raise web.HTTPNotFound()
        method, handler = entry
        if request.method != method and not (method == "GET" and request.method == "HEAD"):
            allowed = [method, "HEAD"] if method == "GET" else [method]
            raise web.HTTPMethodNotAllowed(request.method, allowed)
        return await handler(request)


LIVE = web.AppKey("live", Live)


async def _end_feed(app: web.Application) -> None:
    app[FEED].close()


def create_app(loaded: Loaded) -> web.Application:
    state = state_for(loaded.config, _global_max(loaded.config))
    in_flight: set[asyncio.Task] = set()
    generation = Generation(loaded, state, in_flight)
    # The handler reads a body itself, bounded by its generation's server.max_body_mb.
    app = web.Application(middlewares=[error_envelopes])
    live = app[LIVE] = Live(generation)
    app[STATE] = state
    server = loaded.config.server
    app[CALLS] = Calls(server.call_idle_s, metrics=server.metrics)
    app[FEED] = Feed()  # (nothing to do while no one listens)
    app[IN_FLIGHT] = in_flight
    app.cleanup_ctx.append(client_session)
    app.cleanup_ctx.append(state_ctx)
    app.cleanup_ctx.append(calls_ctx)
    app.on_startup.append(lambda app: live.current.start(app[SESSION]))
    if loaded.config.server.metrics:
        app.on_startup.append(_count_start)
    app.on_shutdown.append(_end_feed)  # an open playground page never holds the drain
    app.on_cleanup.append(lambda _: live.current.aclose())
    if loaded.config.otel is not None:
        otel = loaded.config.otel
        app.on_startup.append(lambda _: asyncio.to_thread(tracing.setup, otel))
        app.on_cleanup.append(lambda _: asyncio.to_thread(tracing.shutdown))
    # One route for every path: the live generation's table says what serves it.
    app.router.add_route("*", "/{path:.*}", live.dispatch)
    return app


async def reload(app: web.Application, loaded: Loaded) -> None:
    """Serve `loaded` from now on; turns in flight finish on what they began with. One
    reload at a time: a second SIGHUP waits for the first, so the last file read wins."""
    live = app[LIVE]
    async with live.reloading:
        state = app[STATE]
        new = Generation(loaded, state, app[IN_FLIGHT])
        try:
            await new.start(app[SESSION])
        except BaseException:
            await new.aclose()
            raise
        old, live.current = live.current, new
        state.limits.max_concurrent = _global_max(loaded.config)
        app[CALLS].idle_s = loaded.config.server.call_idle_s
        old.retire()


async def _count_start(_: web.Application) -> None:
    try:
        version = importlib.metadata.version("llmgate")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    metrics.started(version)


def _own_phrases(route: RouteConfig, config: Config) -> tuple[str, ...]:
    """What llmgate itself may say on `route`, longest first (one may begin another)."""
    phrases: list[str] = []
    if route.rag is not None:
        phrases += config.rag[route.rag].waiting.phrases
    if route.tools and route.tool_filler is not None:
        phrases += route.tool_filler.phrases
    if config.server.on_stream_error == "apology" and config.server.apology:
        phrases.append(config.server.apology)
    return tuple(sorted({p.strip() for p in phrases if p.strip()}, key=len, reverse=True))


def _global_max(config: Config) -> int:
    return config.server.limits.global_max_concurrent or default_global_max()


def _names(config: Config) -> Names:
    """The model and tool names metrics may show (config.toml's own: a bounded set)."""
    models = set(config.models)
    for alias in config.models.values():
        models |= {t.partition("/")[2] or t for t in alias.targets}  # type: ignore[union-attr]
    for provider in config.providers.values():
        models |= set(provider.models) | {provider.default_model or ""}
    return Names(models - {""}, set(config.tools))


def _keys(server: ServerConfig, router: Router) -> KeyCheck:
    """`api_keys` (named by their place) and `[[server.keys]]`, each with its limits and
    the models it may use (a bare model name is the first provider's, as in a request)."""
    limits = server.limits
    default = Rule(limits.max_concurrent, limits.requests_per_minute)
    keys = [Key(key, f"api_keys[{i}]", default) for i, key in enumerate(server.api_keys)]
    for entry in server.keys:
        rule = Rule(
            entry.max_concurrent or default.max_concurrent,  # (None: no limit)
            entry.requests_per_minute or default.requests_per_minute,
        )
        allowed = None
        if entry.allowed_models is not None:
            allowed = frozenset(_model_id(router, m) for m in entry.allowed_models)
        keys.append(Key(entry.key, entry.name, rule, allowed))
    return KeyCheck(keys, default)


def _model_id(router: Router, model: str) -> str:
    """An alias as it is; a model as `provider/model` (`provider/*`: all of its models)."""
    if model in router.aliases or model.endswith("/*"):
        return model
    target = router.resolve(model).first
    return f"{target.provider.name}/{target.model}"


def _call(
    route: RouteConfig,
    config: Config,
    retrievers: dict[str, Reader],
    engines: dict[str, Engine],
    toolbox: Toolbox | None,
) -> Call | None:
    """The route's stages, outermost first, around the provider; None for a plain relay.
    Each stage's module is imported here, by the first route that uses it."""
    stages: list[Stage] = []
    if route.audio is not None:
        from llmgate.stages.audio import AudioStage

        stages.append(AudioStage(config.audio[route.audio], engines[route.audio]))
    if route.speech or route.audio is not None:
        from llmgate.stages.speech import SpeechStage, options_from
        from llmgate.text.speakable import SpeechOptions

        # on an audio route nothing unspeakable reaches the voice, speech asked for or not
        speech = options_from(route.speech) or SpeechOptions()
        stages.append(SpeechStage(speech))
    if route.rag is not None:
        from llmgate.stages.rag import RagStage

        rag = config.rag[route.rag]
        stages.append(RagStage(rag, retrievers[rag.kb]))
    if route.tools:  # innermost: every round of tools is one answer to the stages above
        from llmgate.stages.tools import ToolStage

        assert toolbox is not None
        stages.append(
            ToolStage(
                toolbox, route.tools, route.max_tool_rounds, route.tool_filler,
                route.max_tool_calls,
            )
        )
    return compose(provider_call, stages) if stages else None


def _with_v1(path: str) -> list[str]:
    """A route is served as configured and under /v1, as OpenAI clients add it."""
    if path.startswith("/v1/"):
        return [path, path.removeprefix("/v1")]
    return [path, "/v1" + path]
