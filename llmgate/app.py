"""create_app(config) -> web.Application: wiring only."""

from __future__ import annotations

import logging

from aiohttp import web

from llmgate.config import Config, KbConfig, Loaded, RouteConfig, ServerConfig
from llmgate.kb.embeddings import EmbeddingError, embedder_for
from llmgate.kb.remote import HttpRetriever
from llmgate.kb.retriever import Retriever
from llmgate.pipeline import Call, Stage, compose
from llmgate.server.auth import Key, KeyCheck, Rule
from llmgate.server.handlers import SETTINGS, ChatCompletions, Settings, healthz, list_models
from llmgate.server.limits import LocalLimits
from llmgate.server.middleware import error_envelopes
from llmgate.stages.audio import AudioStage
from llmgate.stages.rag import RagStage
from llmgate.stages.speech import SpeechStage, options_from
from llmgate.stages.tools import ToolStage
from llmgate.text.speakable import SpeechOptions
from llmgate.tools.registry import Toolbox
from llmgate.tts.base import Engine, EngineError
from llmgate.tts.engines import engine_for
from llmgate.turn import CHANNELS, Channels
from llmgate.upstream.catalog import catalog
from llmgate.upstream.client import client_session
from llmgate.upstream.failover import provider_call
from llmgate.upstream.provider import Provider
from llmgate.upstream.router import ROUTER, Router

log = logging.getLogger("llmgate")
ENGINES = web.AppKey("engines", dict)  # [audio.NAME] -> its speech engine
TOOLBOX = web.AppKey("toolbox", Toolbox)  # the [tools.NAME] routes use, started with the app


def create_app(loaded: Loaded) -> web.Application:
    config = loaded.config
    max_body = int(config.server.max_body_mb * 2**20)
    app = web.Application(middlewares=[error_envelopes], client_max_size=max_body)
    app[SETTINGS] = Settings(
        keys=_keys(config.server),
        limits=LocalLimits(config.server.limits.global_max_concurrent),
        max_body=max_body,
        keepalive_s=config.server.keepalive_s,
        apology=config.server.apology if config.server.on_stream_error == "apology" else None,
        read_timeout_s=config.server.read_timeout_s,
    )
    providers = {
        name: Provider(name, provider, loaded.unset_env.get(name, ()))
        for name, provider in config.providers.items()
    }
    app[ROUTER] = Router(providers, config.models)  # type: ignore[arg-type]
    app[CHANNELS] = Channels()
    app.cleanup_ctx.append(client_session)
    app.cleanup_ctx.append(catalog)  # after the session it reads with
    retrievers = {
        name: _retriever(name, config.kb[name], loaded)
        for name in {config.rag[r.rag].kb for r in config.routes if r.rag}
    }
    app.on_cleanup.append(lambda _: _close(retrievers))
    engines = {
        name: engine_for(config.audio[name], loaded, providers)
        for name in {r.audio for r in config.routes if r.audio}
    }
    app[ENGINES] = engines
    app.on_startup.append(lambda _: _start(engines))
    app.on_cleanup.append(lambda _: _stop(engines))
    used = {name for r in config.routes for name in r.tools}
    toolbox = Toolbox({name: config.tools[name] for name in sorted(used)})
    app[TOOLBOX] = toolbox
    app.on_startup.append(lambda _: toolbox.start())
    app.on_cleanup.append(lambda _: toolbox.aclose())
    for route in config.routes:
        call = _call(route, config, retrievers, engines, toolbox)
        handler = ChatCompletions(route.path, call)
        for path in _with_v1(route.path):
            app.router.add_post(path, handler.handle)
    for path in _with_v1("/models"):
        app.router.add_get(path, list_models, allow_head=False)
    app.router.add_get("/healthz", healthz)
    return app


def _keys(server: ServerConfig) -> KeyCheck:
    """`api_keys` (named by their place) and `[[server.keys]]`, each with its limits."""
    limits = server.limits
    default = Rule(limits.max_concurrent, limits.requests_per_minute)
    keys = [Key(key, f"api_keys[{i}]", default) for i, key in enumerate(server.api_keys)]
    for entry in server.keys:
        rule = Rule(
            entry.max_concurrent or default.max_concurrent,
            entry.requests_per_minute or default.requests_per_minute,
        )
        keys.append(Key(entry.key, entry.name, rule))
    return KeyCheck(keys, default)


def _call(
    route: RouteConfig,
    config: Config,
    retrievers: dict[str, Retriever | HttpRetriever],
    engines: dict[str, Engine],
    toolbox: Toolbox,
) -> Call | None:
    """The route's stages, outermost first, around the provider; None for a plain relay."""
    stages: list[Stage] = []
    if route.audio is not None:
        stages.append(AudioStage(config.audio[route.audio], engines[route.audio]))
    speech = options_from(route.speech)
    if speech is None and route.audio is not None:
        speech = SpeechOptions()  # nothing unspeakable reaches the voice
    if speech is not None:
        stages.append(SpeechStage(speech))
    if route.rag is not None:
        rag = config.rag[route.rag]
        stages.append(RagStage(rag, retrievers[rag.kb]))
    if route.tools:  # innermost: every round of tools is one answer to the stages above
        stages.append(
            ToolStage(toolbox, route.tools, route.max_tool_rounds, route.tool_filler)
        )
    return compose(provider_call, stages) if stages else None


def _retriever(name: str, kb: KbConfig, loaded: Loaded) -> Retriever | HttpRetriever:
    if kb.kind == "http":
        assert kb.url is not None
        return HttpRetriever(name, kb.url, kb.headers, kb.timeout_s)
    assert kb.path is not None
    try:
        # A question's vector is on the voice path: a dead endpoint costs at most this.
        embedder = embedder_for(kb, loaded, timeout_s=2.0)
    except EmbeddingError as exc:
        log.warning("kb.%s.embeddings: %s; retrieval is BM25 alone", name, exc)
        embedder = None
    return Retriever(name, loaded.path(kb.path), embedder)


async def _close(retrievers: dict[str, Retriever | HttpRetriever]) -> None:
    for retriever in retrievers.values():
        await retriever.aclose()


async def _start(engines: dict[str, Engine]) -> None:
    """Each engine readied once (piper's voice loaded): one that cannot be is logged, and
    its routes answer 503 saying why, rather than llmgate not starting at all."""
    for name, engine in engines.items():
        try:
            await engine.start()
        except EngineError as exc:
            log.error("audio.%s: %s; its routes will answer 503", name, exc)


async def _stop(engines: dict[str, Engine]) -> None:
    for engine in engines.values():
        await engine.aclose()


def _with_v1(path: str) -> list[str]:
    """A route is served as configured and under /v1, as OpenAI clients add it."""
    if path.startswith("/v1/"):
        return [path, path.removeprefix("/v1")]
    return [path, "/v1" + path]
