"""`python -m llmgate check`: probe every provider, tool, knowledge base and voice of a config."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from llmgate import config as configuration
from llmgate import http
from llmgate.config import (
    AudioConfig,
    Config,
    HttpToolConfig,
    KbConfig,
    Loaded,
    McpToolConfig,
    OpenaiAudio,
)
from llmgate.errors import ApiError, UpstreamStatus
from llmgate.kb import bases
from llmgate.kb.base import KbError, KbMissing
from llmgate.tts.base import EngineError
from llmgate.tts.engines import engine_for
from llmgate.upstream.catalog import ask, models_of
from llmgate.upstream.client import SESSION, client_session
from llmgate.upstream.provider import Provider

OK, FAIL, SKIP = "ok", "FAIL", "skip"
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, configuration.EXIT_CONFIG
NO_MODELS_LIST = (404, 405)  # some OpenAI-compatible servers have no GET /models
PHRASE = "This is llmgate, checking its voice."
MAX_ANSWER = 64 * 1024
MAX_NAMES = 10  # tool names shown on a row
_NO_TIMEOUT = aiohttp.ClientTimeout(total=None)  # each probe is bounded by --timeout


@dataclass(frozen=True)
class Row:
    what: str
    status: str
    detail: str


class Failed(Exception):
    """A probe that failed; the message is the row's detail, safe to print."""


class _Completion(msgspec.Struct):
    choices: list[Any]


def main(argv: list[str]) -> int:
    try:
        args = _parse(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already printed
        return exc.code if isinstance(exc.code, int) else EXIT_CONFIG
    try:
        loaded = configuration.load(args.config)
    except configuration.ConfigError as exc:
        print(f"config: {exc}")
        return EXIT_CONFIG
    # the first-run rule, as serving applies it: no caller key on a non-loopback host
    refusal = configuration.open_refusal(loaded.config.server, loaded.config.server.host)
    if refusal is not None:
        print(f"config: {refusal}")
        return EXIT_CONFIG
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    rows = asyncio.run(check(loaded, args.timeout, args.config))
    print(table(rows))
    return EXIT_FAILED if any(row.status == FAIL for row in rows) else EXIT_OK


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llmgate check",
        description="Validate the config, then probe each provider, tool, knowledge base "
        "and audio engine it names. Exit 0: all ok; 1: something failed; 2: config error.",
    )
    parser.add_argument(
        "--config", default="config.toml", help="TOML config (default: %(default)s)"
    )
    parser.add_argument(
        "--timeout", type=_seconds, default=5.0, help="seconds per probe (default: %(default)s)"
    )
    return parser.parse_args(argv)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError("expected a number of seconds above 0")
    return value


def table(rows: list[Row]) -> str:
    lines = [Row("what", "status", "detail"), *rows]
    what = max(len(row.what) for row in lines)
    status = max(len(row.status) for row in lines)
    return "\n".join(
        f"{row.what:<{what}}  {row.status:<{status}}  {row.detail}".rstrip() for row in lines
    )


async def check(loaded: Loaded, timeout: float, config_path: str = "config.toml") -> list[Row]:
    """Every probe at once, each bounded by `timeout`; the rows in the config's order."""
    config = loaded.config
    providers = {
        name: Provider(name, provider, loaded.unset_env.get(name, ()))
        for name, provider in config.providers.items()
    }
    used = (config.tools[name] for route in config.routes for name in route.tools)
    if any(isinstance(tool, McpToolConfig) for tool in used):
        _mcp_module()  # its import blocks for seconds: not while the other probes are timed
    async with _session() as session:
        probes = [
            *(_provider_row(p, session, timeout) for p in providers.values()),
            *_tool_rows(config, session, timeout),
            *(_kb_row(n, kb, loaded, timeout, config_path) for n, kb in config.kb.items()),
            *(_audio_row(n, a, loaded, providers, timeout) for n, a in config.audio.items()),
            *([_timed("state redis", _redis(config, timeout), timeout)]
              if config.state.redis_url else []),
        ]
        return list(await asyncio.gather(*probes))


@contextlib.asynccontextmanager
async def _session() -> AsyncIterator[aiohttp.ClientSession]:
    """The server's own upstream client (its cleanup_ctx), so a probe goes out as a turn's."""
    app = web.Application()
    opened = client_session(app)
    await anext(opened)
    try:
        yield app[SESSION]
    finally:
        await anext(opened, None)


async def _timed(what: str, probe: Awaitable[tuple[str, str]], timeout: float) -> Row:
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            status, detail = await probe
    except Failed as exc:
        status, detail = FAIL, str(exc)
    except TimeoutError:
        status, detail = FAIL, f"no answer within {timeout:g} s"
    except Exception as exc:  # a probe's own bug must not hide the other rows
        status, detail = FAIL, f"unexpected {type(exc).__name__}"
    return Row(what, status, f"{_ms(start)} ms; {detail}")


async def _redis(config: Config, timeout: float) -> tuple[str, str]:
    """[state]: PING and the scripts loaded (redis imported only when configured)."""
    from llmgate.state.redis import probe

    try:
        return OK, await probe(config.state, timeout)
    except ConnectionError as exc:  # (its text names host and port, never the password)
        raise Failed(str(exc)) from None


async def _ready(row: Row) -> Row:
    return row  # a row known without probing, kept in its place among the probed ones


def _ms(start: float) -> int:
    return round((time.perf_counter() - start) * 1000)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# -- providers -------------------------------------------------------------------------------


async def _provider_row(
    provider: Provider, session: aiohttp.ClientSession, timeout: float
) -> Row:
    what = f"provider {provider.name}"
    if provider.unset_env:  # nothing to ask it with; the names only, never a value
        return Row(what, FAIL, _unset(provider.unset_env))
    row = await _timed(what, _provider(provider, session, timeout), timeout)
    return dataclasses.replace(row, detail=provider.redact(row.detail))


def _unset(names: tuple[str, ...]) -> str:
    if len(names) == 1:
        return f"environment variable {names[0]} is not set"
    return f"environment variables {', '.join(names)} are not set"


async def _provider(
    provider: Provider, session: aiohttp.ClientSession, timeout: float
) -> tuple[str, str]:
    try:
        models = await models_of(session, provider)
    except ApiError as exc:
        if exc.status in NO_MODELS_LIST:
            return await _complete_instead(provider, session, exc.status, timeout)
        return _refused(provider, exc)
    return OK, f"lists {_plural(len(models), 'model')}"


async def _complete_instead(
    provider: Provider, session: aiohttp.ClientSession, status: int, timeout: float
) -> tuple[str, str]:
    config = provider.config
    model = config.default_model or next(iter(config.models), None)
    if model is None:
        return SKIP, (
            f"no /models (HTTP {status}), and no default_model or models to try a "
            "1-token completion with"
        )
    try:
        await _one_token(provider, session, model, timeout)
    except ApiError as exc:
        return _refused(provider, exc)
    return OK, f"no /models (HTTP {status}); a 1-token completion of {model} answered"


async def _one_token(
    provider: Provider, session: aiohttp.ClientSession, model: str, timeout: float
) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "Say ok."}]}
    data = msgspec.json.encode({**body, "max_tokens": 1, "stream": False})
    limit = aiohttp.ClientTimeout(total=timeout)  # (passthrough: no key at all)
    raw = await ask(session, provider, "POST", provider.url, MAX_ANSWER, limit, data)
    if (error := provider.answer_error(raw)) is not None:
        raise error
    try:
        msgspec.json.decode(raw, type=_Completion)
    except msgspec.DecodeError:
        raise Failed("its 1-token completion is not a chat.completion") from None


def _refused(provider: Provider, exc: ApiError) -> tuple[str, str]:
    if provider.passthrough and exc.status == 401:
        # Asked without a key: each caller's own is what it accepts.
        return OK, "passthrough: callers bring their own key"
    if isinstance(exc, UpstreamStatus) and exc.status < 500:
        raise Failed(f"{exc.message} (HTTP {exc.status})")
    raise Failed(exc.message)


# -- tools -----------------------------------------------------------------------------------


def _tool_rows(
    config: Config, session: aiohttp.ClientSession, timeout: float
) -> list[Awaitable[Row]]:
    used = {name for route in config.routes for name in route.tools}
    rows: list[Awaitable[Row]] = []
    for name, tool in config.tools.items():
        what = f"tool {name}"
        if name not in used:
            rows.append(_ready(Row(what, SKIP, "no route uses it")))
        elif isinstance(tool, McpToolConfig):
            rows.append(_timed(what, _mcp(name, tool), timeout))
        else:
            rows.append(_timed(what, _reach(tool, session), timeout))
    return rows


async def _reach(tool: HttpToolConfig, session: aiohttp.ClientSession) -> tuple[str, str]:
    # HEAD, never the tool's own method: a call with made-up arguments could do something.
    # Any answer at all means it is reachable; the URL is never shown (it may hold a key).
    try:
        async with http.request(
            session, "HEAD", tool.url, headers=tool.headers, timeout=_NO_TIMEOUT
        ) as resp:
            return OK, f"reachable (HTTP {resp.status} to HEAD)"
    except http.StatusError as exc:
        return OK, f"reachable (HTTP {exc.status} to HEAD)"
    except http.HttpError as exc:
        raise Failed(str(exc)) from None


async def _mcp(name: str, tool: McpToolConfig) -> tuple[str, str]:
    mcp = _mcp_module()
    # the server's own MCP client, for one connection: the tools it listed, or why it failed
    server = mcp.McpServer(name, tool.url, tool.headers, tool.allowed, tool.timeout_s, once=True)
    await server.start()
    try:
        names = [listed.spec.name for listed in await server.first_listing()]
    except mcp.McpUnavailable as exc:  # its own description: no URL query, no header value
        raise Failed(str(exc)) from None
    finally:
        await server.aclose()
    missing = sorted(set(tool.allowed or ()) - set(names))
    if missing:
        raise Failed(f"does not offer {', '.join(missing)}; lists {_names(names)}")
    if not names:
        raise Failed("lists no tools")
    return OK, f"lists {_names(names)}"


def _names(names: list[str]) -> str:
    if not names:
        return "no tools"
    shown = ", ".join(names[:MAX_NAMES]) + (", ..." if len(names) > MAX_NAMES else "")
    return f"{_plural(len(names), 'tool')}: {shown}"


def _mcp_module() -> ModuleType:
    # The mcp SDK takes seconds to import: only when a config has an MCP server.
    from llmgate.tools import mcp

    return mcp


# -- knowledge bases -------------------------------------------------------------------------


def _kb_row(
    name: str, kb: KbConfig, loaded: Loaded, timeout: float, config_path: str
) -> Awaitable[Row]:
    return _timed(f"kb {name}", _probe_kb(name, kb, loaded, config_path), timeout)


async def _probe_kb(name: str, kb: KbConfig, loaded: Loaded, config_path: str) -> tuple[str, str]:
    """The base as the server would search it (llmgate.kb.bases): it holds something, and
    answers one search. A message names the base, never a URL's path or a password."""
    reader = bases.reader(name, kb, loaded)
    try:
        await reader.start()
        return OK, await reader.probe()
    except KbMissing as exc:
        ingest = f"python -m llmgate kb ingest --config {config_path} --kb {name} FILES..."
        raise Failed(f"{exc}: run `{ingest}`") from None
    except KbError as exc:
        raise Failed(str(exc)) from None
    finally:
        await reader.aclose()


# -- audio -----------------------------------------------------------------------------------


async def _audio_row(
    name: str, audio: AudioConfig, loaded: Loaded, providers: dict[str, Provider], timeout: float
) -> Row:
    row = await _timed(f"audio {name}", _speak(audio, loaded, providers), timeout)
    if isinstance(audio, OpenaiAudio):  # its errors may quote its provider
        row = dataclasses.replace(row, detail=providers[audio.provider].redact(row.detail))
    return row


async def _speak(
    audio: AudioConfig, loaded: Loaded, providers: dict[str, Provider]
) -> tuple[str, str]:
    engine = engine_for(audio, loaded, providers)
    rate = size = 0
    try:
        start = time.perf_counter()
        await engine.start()  # piper loads its voice here, as at the server's start-up
        engine.check()
        started, start = _ms(start), time.perf_counter()
        # closed however it ends: a timeout must stop the engine's work too
        async with contextlib.aclosing(engine.synthesize(PHRASE)) as pieces:  # type: ignore[type-var]
            async for piece_rate, pcm in pieces:
                rate, size = piece_rate, size + len(pcm)
    except EngineError as exc:
        raise Failed(str(exc)) from None
    finally:
        await engine.aclose()
    if not size:
        raise Failed(f"{engine.name} spoke no audio")
    return OK, (
        f"{engine.name}: started in {started} ms, spoke a phrase in {_ms(start)} ms "
        f"({size} bytes of PCM16 at {rate} Hz)"
    )
