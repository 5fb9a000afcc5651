"""config.toml: typed settings, ${VAR} expansion, and errors that name the key."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from yarl import URL

from llmgate.protocol import error_path

PASSTHROUGH = "passthrough"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_Positive = Annotated[float, msgspec.Meta(gt=0)]


class ConfigError(Exception):
    """A mistake in the configuration; the message names the key."""


class _Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


_Count = Annotated[int, msgspec.Meta(ge=1)]
APOLOGY = "Sorry, I lost my connection. Could you say that again?"


class LimitsConfig(_Strict):
    # Per caller key, none by default: one Agora key carries every call of a deployment.
    max_concurrent: _Count | None = None  # streams in flight per caller key
    requests_per_minute: _Count | None = None  # per caller key
    # streams in flight in all; None: sized from the process's open-file limit
    global_max_concurrent: _Count | None = None


class KeyConfig(_Strict):
    key: str
    name: str  # what the log line names (never the key)
    max_concurrent: _Count | None = None  # None: [server.limits]'
    requests_per_minute: _Count | None = None
    # None: any model; else aliases, `provider/model` or `provider/*` this key may ask for
    allowed_models: list[str] | None = None


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8000
    api_keys: list[str] = []
    keys: list[KeyConfig] = []  # keys with a name and limits of their own
    limits: LimitsConfig = LimitsConfig()
    # after the stream began: an error frame, or a spoken apology and a normal end
    on_stream_error: Literal["error_frame", "apology"] = "error_frame"
    apology: Annotated[str, msgspec.Meta(min_length=1)] = APOLOGY
    max_body_mb: _Positive = 16.0
    keepalive_s: _Positive = 15.0
    send_timeout_s: _Positive = 30.0
    uvloop: bool = True
    # a request's headers (from its first byte) and its body must each arrive this soon
    read_timeout_s: _Positive = 30.0
    answer_timeout_s: _Positive = 300.0  # a non-streamed answer must be whole within this
    # a channel with no turn for this long has ended: its `call` line is written
    call_idle_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 120.0
    drain_s: Annotated[float, msgspec.Meta(ge=0)] = 20.0  # SIGTERM: streams in flight finish
    # no caller key: a loopback host starts open (with a warning); any other refuses unless
    allow_unauthenticated: bool = False
    workers: Annotated[int, msgspec.Meta(ge=1, le=256)] = 1  # processes on one port
    metrics: bool = True  # GET /metrics (Prometheus) and the counting behind it
    metrics_key: str | None = None  # a bearer key for /metrics; None: loopback callers only


class LogConfig(_Strict):
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"


class BreakerConfig(_Strict):
    failures: _Count = 5  # this many failures ...
    window_s: _Positive = 30.0  # ... within this long open the circuit ...
    cooldown_s: _Positive = 30.0  # ... for this long; then one request probes it


class AliasConfig(_Strict):
    targets: Annotated[list[str], msgspec.Meta(min_length=1)]
    # no first token from the current target this long: the next one starts as well
    hedge_after_ms: Annotated[int, msgspec.Meta(ge=1)] | None = None


class ProviderConfig(_Strict, kw_only=True):
    kind: Literal["openai"] = "openai"
    base_url: str
    api_key: str = ""
    models: list[str] = []
    default_model: str | None = None
    headers: dict[str, str] = {}
    forward_fields: list[str] = []
    connect_timeout_s: _Positive = 10.0
    first_token_timeout_s: _Positive = 60.0
    idle_timeout_s: _Positive = 30.0
    breaker: BreakerConfig = BreakerConfig()
    models_refresh_s: _Positive = 600.0  # how often a provider's own /models is read again
    # "channel": send OpenAI's prompt_cache_key as a hash of the Agora channel (never its
    # name) unless the caller sent one; off by default (a provider may refuse the field)
    prompt_cache_key: Literal["off", "channel"] = "off"


class SpeechConfig(_Strict):
    markdown: bool = True
    emoji: bool = True
    urls: Literal["drop", "domain", "keep"] = "domain"  # a dropped link left "go to or for more"


class _Kb(_Strict, tag_field="kind"):
    """A [kb.NAME]: its `kind` (sqlite when not given) picks one of the structs below."""


class _StoredKb(_Kb, kw_only=True):
    """What llmgate chunks, stores and searches itself (SQLite or PostgreSQL)."""

    chunk_tokens: Annotated[int, msgspec.Meta(ge=20, le=4000)] = 200
    overlap_tokens: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 30
    embeddings: str | None = None  # a provider whose /embeddings gives dense vectors
    embedding_model: str = "text-embedding-3-small"


class SqliteKb(_StoredKb, tag="sqlite", kw_only=True):
    """A knowledge base in one SQLite file (FTS5's BM25, and vectors if it has embeddings)."""

    # the file, relative to the config file; created by `kb ingest` (needed: _check_kb)
    path: str = ""


class PostgresKb(_StoredKb, tag="postgres", kw_only=True):
    """A knowledge base in a PostgreSQL table (tsvector + GIN; pgvector HNSW with embeddings)."""

    dsn: str = ""  # postgresql://user:pass@host:5432/db; never logged (only host, port, db)
    table: str = "llmgate_docs"  # several bases may share one database (a plain identifier)
    language: str = "english"  # the text-search configuration of the lexical index
    pool_max: Annotated[int, msgspec.Meta(ge=1, le=200)] = 10
    timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=60_000)] = 300  # slower: nothing found
    ef_search: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 40  # HNSW's candidate list


class HttpKb(_Kb, tag="http", kw_only=True):
    """A retrieval service of the operator's own (README has its contract)."""

    url: str = ""  # needed, and checked as a URL (_check_kb)
    headers: dict[str, str] = {}
    timeout_s: _Positive = 2.0


KbConfig = SqliteKb | PostgresKb | HttpKb


class WaitingConfig(_Strict):
    phrases: list[str] = msgspec.field(default_factory=lambda: ["One moment, let me check."])
    after_ms: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0: at once; N: only if no answer by then


class RagConfig(_Strict):
    kb: str
    top_k: Annotated[int, msgspec.Meta(ge=1, le=50)] = 4
    min_score: float = 0.0
    query_turns: Annotated[int, msgspec.Meta(ge=1, le=20)] = 2
    template: str | None = None  # None: llmgate's own (README)
    waiting: WaitingConfig = msgspec.field(default_factory=WaitingConfig)  # phrases = []: none
    # the passages' budget, estimated as characters / 4: a small context is not overflowed
    max_context_tokens: Annotated[int, msgspec.Meta(ge=50, le=1_000_000)] = 2000
    # where the passages go: just before the newest user message(s), so everything before
    # them is what the last turn sent (the provider's prompt cache holds); in that message's
    # text (providers that merge every system message into one); or after the system prompt
    placement: Literal["before_question", "in_question", "system"] = "before_question"


class _Audio(_Strict, tag_field="engine", kw_only=True):
    """An [audio.NAME]: its `engine` (piper when not given) picks one of the structs below;
    what every engine has is here."""

    voice: str = ""  # engine-specific; "" = the engine's default voice
    sample_rate: Annotated[int, msgspec.Meta(ge=8000, le=48000)] = 16000
    chunk_ms: Annotated[int, msgspec.Meta(ge=10, le=200)] = 40
    pace: bool = True  # no faster than real time ...
    lead_ms: Annotated[int, msgspec.Meta(ge=0, le=10000)] = 200  # ... this far ahead of it
    max_words: Annotated[int, msgspec.Meta(ge=4, le=200)] = 20  # a longer clause is cut
    # the same for the answer's first piece alone; None: the engine's own (5 for piper,
    # which makes a piece's audio all at once; max_words for the others, which stream it)
    first_words: Annotated[int, msgspec.Meta(ge=1, le=200)] | None = None
    # PCM that comes with a rate of its own (the openai engine, a model's own delta.audio)
    source_rate: Annotated[int, msgspec.Meta(ge=8000, le=48000)] = 24000


class PiperAudio(_Audio, tag="piper"):
    """Piper: `voice` is a .onnx file, relative to the config file."""


class EspeakAudio(_Audio, tag="espeak"):
    """espeak-ng: `voice` is one of its voices."""


class OpenaiAudio(_Audio, tag="openai", kw_only=True):
    """An OpenAI-compatible /audio/speech, configured as a [providers.NAME]."""

    provider: str
    model: str = "gpt-4o-mini-tts"


class FileAudio(_Audio, tag="file", kw_only=True):
    """A fixed announcement: PCM16 mono at file_rate, and its transcript."""

    pcm_file: Annotated[str, msgspec.Meta(min_length=1)]
    text_file: str | None = None
    file_rate: Annotated[int, msgspec.Meta(ge=8000, le=48000)] = 16000


AudioConfig = PiperAudio | EspeakAudio | OpenaiAudio | FileAudio


class _Tool(_Strict, tag_field="kind", kw_only=True):
    """A [tools.NAME]: its `kind` (required) picks one of the structs below; what every
    kind has is here."""

    url: str
    headers: dict[str, str] = {}
    timeout_s: _Positive = 5.0
    metadata: dict[str, str] = {}  # turn metadata key -> the header it goes in


class HttpToolConfig(_Tool, tag="http", kw_only=True):
    """One endpoint, one tool named after its [tools.NAME]."""

    method: Literal["GET", "POST"] = "POST"  # GET sends the arguments as query parameters
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )


class McpToolConfig(_Tool, tag="mcp", kw_only=True):
    """An MCP server (streamable HTTP) and which of its tools the model may call."""

    allowed: list[str] | None = None
    # what one server may add to every request: tools past max_tools and tools whose input
    # schema is over max_schema_bytes (as JSON) are left out, descriptions are cut
    max_tools: Annotated[int, msgspec.Meta(ge=1, le=128)] = 32
    max_description_chars: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 1024
    max_schema_bytes: Annotated[int, msgspec.Meta(ge=64, le=1_000_000)] = 8192


ToolConfig = HttpToolConfig | McpToolConfig

# A section of several kinds: the key that names its kind, the kind when none is given
# (None: it must be), and its structs, one a kind.
_KINDS: dict[str, tuple[str, str | None, tuple[type[msgspec.Struct], ...]]] = {
    "kb": ("kind", "sqlite", (SqliteKb, PostgresKb, HttpKb)),
    "audio": ("engine", "piper", (PiperAudio, EspeakAudio, OpenaiAudio, FileAudio)),
    "tools": ("kind", None, (HttpToolConfig, McpToolConfig)),
}


def kind_of(section: msgspec.Struct) -> str:
    """What a [kb.NAME], [audio.NAME] or [tools.NAME] says its kind (or engine) is."""
    return str(type(section).__struct_config__.tag)


class FillerConfig(_Strict):
    phrases: list[str] = msgspec.field(default_factory=lambda: ["Let me check that for you."])
    after_ms: Annotated[int, msgspec.Meta(ge=0)] = 700


class RouteConfig(_Strict, kw_only=True):
    path: str
    speech: bool | SpeechConfig = False  # true = every part of SpeechConfig on
    rag: str | None = None  # a [rag.NAME]
    audio: str | None = None  # an [audio.NAME]
    tools: list[str] = []  # [tools.NAME] llmgate runs itself
    max_tool_rounds: Annotated[int, msgspec.Meta(ge=1, le=20)] = 4
    # llmgate's own calls run in one round; the rest are answered "not run"
    max_tool_calls: Annotated[int, msgspec.Meta(ge=1, le=128)] = 16
    tool_filler: FillerConfig | None = None  # said while a round of tools runs long


class StateConfig(_Strict):
    # redis://[:password@]host:port/db or rediss:// (TLS); "" (or no [state]): this process's own
    redis_url: str = ""
    key_prefix: str = "llmgate:"  # several deployments may share one Redis
    timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 50  # slower: Redis is down
    lease_s: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 30.0  # a dead process's slots


class PlaygroundConfig(_Strict):
    enabled: bool = False  # /playground (the page), its /routes and /events: off unless asked
    allow_remote: bool = False  # like /metrics: loopback callers only unless this is set


class OtelConfig(_Strict):
    # OTLP over HTTP (protobuf), e.g. "http://127.0.0.1:4318/v1/traces"; traces are off
    # without an [otel] section
    endpoint: str
    service_name: str = "llmgate"
    headers: dict[str, str] = {}  # e.g. an API key of the collector's: "${OTEL_KEY}"
    sample_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0  # of turns with no parent


class Config(_Strict):
    server: ServerConfig = ServerConfig()
    log: LogConfig = LogConfig()
    otel: OtelConfig | None = None
    state: StateConfig = StateConfig()
    playground: PlaygroundConfig = PlaygroundConfig()
    providers: dict[str, ProviderConfig] = {}
    models: dict[str, list[str] | AliasConfig] = {}  # aliases: ordered targets
    kb: dict[str, KbConfig] = {}
    rag: dict[str, RagConfig] = {}
    audio: dict[str, AudioConfig] = {}
    tools: dict[str, ToolConfig] = {}
    routes: list[RouteConfig] = msgspec.field(
        default_factory=lambda: [RouteConfig(path="/chat/completions")]
    )


@dataclass(frozen=True)
class Loaded:
    """A decoded config and what its environment lacked."""

    config: Config
    # provider name -> names of its unset ${VAR}s (never their values)
    unset_env: dict[str, tuple[str, ...]] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    base_dir: Path = Path(".")  # the config file's folder: relative paths start there

    def path(self, value: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        return self.base_dir / Path(value).expanduser()


def open_refusal(server: ServerConfig, host: str) -> str | None:
    """Why a server with no caller key must not start on `host` (None: it may). A first run
    on a laptop (loopback) starts open; anything reachable from elsewhere needs a key or
    `server.allow_unauthenticated = true`."""
    if server.api_keys or server.keys or server.allow_unauthenticated or is_loopback(host):
        return None
    return (
        f"server.api_keys: no caller key is set and server.host is {host}, which others can "
        "reach; set one (LLMGATE_API_KEY for config.toml's ${LLMGATE_API_KEY}), listen on "
        "127.0.0.1, or set server.allow_unauthenticated = true"
    )


EXIT_CONFIG = 2  # every command's exit status for a config that does not load


def load_or_say(path: str) -> Loaded | None:
    """The config, or None once stderr says what is wrong with it (the key, the file)."""
    try:
        return load(path)
    except ConfigError as exc:
        print(f"llmgate: config error: {exc}", file=sys.stderr)
        return None


def load_to_serve(path: str, host: str) -> Loaded:
    """`load`, and the first-run rule for `host`: a ConfigError says what is wrong."""
    loaded = load(path)
    refusal = open_refusal(loaded.config.server, host)
    if refusal is not None:
        raise ConfigError(refusal)
    return loaded


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # an IPv4 peer on an IPv6 socket
    return (mapped or address).is_loopback


def load(path: str) -> Loaded:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    return dataclasses.replace(parse(raw, os.environ), base_dir=Path(path).resolve().parent)


def parse(raw: dict[str, Any], env: os._Environ[str] | dict[str, str]) -> Loaded:
    missing: list[tuple[tuple[Any, ...], str]] = []
    expanded = _expand(raw, (), env, missing)
    warnings: list[str] = []
    unset_env: dict[str, tuple[str, ...]] = {}
    dropped: dict[str, set[int]] = {"api_keys": set(), "keys": set()}
    unset_keys: list[str] = []
    for where, var in missing:
        key = _dotted(where)
        if where[:2] in (("server", "api_keys"), ("server", "keys")) and len(where) >= 3:
            dropped[where[1]].add(where[2])
            unset_keys.append(var)
            warnings.append(f"{key}: ${{{var}}} is not set; that key is ignored")
        elif where[:1] == ("providers",) and len(where) >= 3:
            name = where[1]
            unset_env[name] = (*unset_env.get(name, ()), var)
            warnings.append(
                f"{key}: ${{{var}}} is not set; requests to provider '{name}' will fail"
            )
        else:
            raise ConfigError(f"{key}: environment variable {var} is not set")
    server = expanded.get("server", {})
    for section, indexes in dropped.items():
        if indexes and isinstance(server.get(section), list):
            server[section] = [k for i, k in enumerate(server[section]) if i not in indexes]
    config = _decode(expanded)
    if not config.server.api_keys and not config.server.keys:
        what = f" ({', '.join(unset_keys)} unset)" if unset_keys else ""
        warnings.append(f"server.api_keys: no caller key is set{what}: requests need no key")
    return Loaded(config, unset_env, tuple(warnings))


def _expand(value: Any, where: tuple[Any, ...], env: Any, missing: list) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            var, default = m.group(1), m.group(2)
            if var in env and env[var] != "":
                return env[var]
            if default is not None:
                return default
            missing.append((where, var))
            return ""

        return _ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, (*where, k), env, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, (*where, i), env, missing) for i, v in enumerate(value)]
    return value


def _dotted(where: tuple[Any, ...]) -> str:
    out = ""
    for part in where:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _decode(raw: dict[str, Any]) -> Config:
    # Named sections are decoded one by one, so that a mistake names its section
    # (`rag.docs.top_k`), not a path through a mapping.
    kinds = {
        "providers": ProviderConfig,
        "kb": KbConfig,
        "rag": RagConfig,
        "audio": AudioConfig,
        "tools": ToolConfig,
    }
    named = {key: _sections(raw, key) for key in kinds}
    models = {
        name: _convert(value, list[str] | AliasConfig, f"models.{name}")
        for name, value in _sections(raw, "models").items()
    }
    config = _convert(raw, Config, "")
    decoded, kb, rag, audio, tools = (
        {name: _section(body, kinds[key], key, name) for name, body in named[key].items()}
        for key in kinds
    )
    config = msgspec.structs.replace(config, kb=kb, rag=rag, audio=audio, tools=tools)
    for name, tool in tools.items():
        if not _is_url(tool.url):
            raise ConfigError(f"tools.{name}.url: expected a URL (http:// or https://)")
    if not decoded:
        raise ConfigError("providers: at least one [providers.NAME] section is needed")
    for name, provider in decoded.items():
        _check_provider(name, provider)
    aliases = {name: _alias(name, value, decoded) for name, value in models.items()}
    _check_keys(config.server)
    for name, kb_config in config.kb.items():
        _check_kb(name, kb_config, decoded)
    for name, rag in config.rag.items():
        if rag.kb not in config.kb:
            raise ConfigError(f"rag.{name}.kb: no [kb.{rag.kb}] section")
    for name, audio in config.audio.items():
        _check_audio(name, audio, decoded)
    for i, route in enumerate(config.routes):
        if route.rag is not None and route.rag not in config.rag:
            raise ConfigError(f"routes[{i}].rag: no [rag.{route.rag}] section")
        if route.audio is not None and route.audio not in config.audio:
            raise ConfigError(f"routes[{i}].audio: no [audio.{route.audio}] section")
        for tool in route.tools:
            if tool not in config.tools:
                raise ConfigError(f"routes[{i}].tools: no [tools.{tool}] section")
    redis_url = config.state.redis_url
    if redis_url and URL(redis_url).scheme not in ("redis", "rediss", "unix"):
        # (the value is not repeated: it may hold a password)
        raise ConfigError("state.redis_url: expected redis://, rediss:// (TLS) or unix://")
    seen = {"/models", "/healthz"}  # served by llmgate itself
    for i, route in enumerate(config.routes):
        if not route.path.startswith("/"):
            raise ConfigError(f"routes[{i}].path: expected a path starting with '/'")
        bare = route.path.removeprefix("/v1") or "/"  # each route is also served under /v1
        if bare in seen:
            raise ConfigError(f"routes[{i}].path: {route.path} is already served")
        seen.add(bare)
    return msgspec.structs.replace(config, providers=decoded, models=aliases)


def _alias(
    name: str, value: list[str] | AliasConfig, providers: dict[str, ProviderConfig]
) -> AliasConfig:
    """An alias with every target checked: `provider/model`, or a bare model for the
    first provider. Targets name models, not other aliases."""
    alias = value if isinstance(value, AliasConfig) else AliasConfig(targets=value)
    if not name:
        raise ConfigError("models: an alias needs a name")
    if not alias.targets:
        raise ConfigError(f"models.{name}: an alias needs at least one target")
    for i, target in enumerate(alias.targets):
        key = f"models.{name}" + ("" if isinstance(value, list) else ".targets") + f"[{i}]"
        prefix, slash, model = target.partition("/")
        if not target or (slash and not model):
            raise ConfigError(f"{key}: expected 'provider/model' or a model name")
        if slash and prefix not in providers:
            # Strict where the request's own model is lenient: a typo here would send
            # every turn of the alias to the first provider under a wrong name.
            known = ", ".join(providers)
            raise ConfigError(
                f"{key}: no [providers.{prefix}] (providers: {known}; a model whose name "
                "has a '/' is written with its provider first)"
            )
    return alias


def _check_keys(server: ServerConfig) -> None:
    # Names are what limits count by: two keys of one name would share a budget.
    names = {f"api_keys[{i}]" for i in range(len(server.api_keys))} | {"open"}
    keys = set(server.api_keys)
    for i, key in enumerate(server.keys):
        if not key.key or key.key in keys:
            raise ConfigError(f"server.keys[{i}].key: expected a key given nowhere else")
        if not key.name or key.name in names:
            raise ConfigError(f"server.keys[{i}].name: expected a name no other key has")
        names.add(key.name)
        keys.add(key.key)


def _sections(raw: dict[str, Any], key: str) -> dict[str, Any]:
    sections = raw.pop(key, {})
    if not isinstance(sections, dict):
        raise ConfigError(f"{key}: expected a table of [{key}.NAME] sections")
    return sections


def _convert(raw: Any, type_: type, prefix: str) -> Any:
    try:
        return msgspec.convert(raw, type_)
    except msgspec.ValidationError as exc:
        what, path = error_path(exc)
        key = ".".join(p for p in (prefix, path.removeprefix("$").lstrip(".")) if p)
        raise ConfigError(f"{key or 'config'}: {what}") from None


def _section(raw: Any, type_: Any, section: str, name: str) -> Any:
    """One [section.NAME]. A section of several kinds gets its default kind here, and an
    unknown kind, or a key of another kind than its own, is told as such."""
    key = f"{section}.{name}"
    kinds = _KINDS.get(section)
    if kinds is None or not isinstance(raw, dict):
        return _convert(raw, type_, key)
    tag_field, default, structs = kinds
    by_tag = {str(s.__struct_config__.tag): s for s in structs}
    allowed = ", ".join(f'"{tag}"' for tag in by_tag)
    given = tag_field in raw
    if not given:
        if default is None:
            raise ConfigError(f"{key}.{tag_field}: is required (one of {allowed})")
        raw = {tag_field: default, **raw}
    tag = raw[tag_field]
    if not isinstance(tag, str) or tag not in by_tag:
        got = f' (not "{tag}")' if isinstance(tag, str) else ""
        raise ConfigError(f"{key}.{tag_field}: expected one of {allowed}{got}")
    for entry in raw:
        others = [t for t, s in by_tag.items() if entry in s.__struct_fields__]
        if entry != tag_field and others and tag not in others:
            theirs = " or ".join(f'{tag_field} = "{t}"' for t in others)
            mine = f'{tag_field} = "{tag}"' + ("" if given else ", the default")
            raise ConfigError(f"{key}.{entry}: a key of {theirs}, not of {mine}")
    return _convert(raw, type_, key)


_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,47}")


def _check_kb(name: str, kb: KbConfig, providers: dict[str, ProviderConfig]) -> None:
    # What the types do not say: a path that is not empty, a URL's shape, a provider that is.
    key = f"kb.{name}"
    match kb:
        case SqliteKb():
            if not kb.path:
                raise ConfigError(f"{key}.path: a sqlite knowledge base needs its file's path")
            if kb.embeddings is not None and kb.embeddings not in providers:
                raise ConfigError(f"{key}.embeddings: no [providers.{kb.embeddings}]")
        case PostgresKb():
            if not kb.dsn.startswith(("postgresql://", "postgres://")):
                raise ConfigError(f"{key}.dsn: expected postgresql://user:password@host:5432/db")
            if not _IDENTIFIER.fullmatch(kb.table):
                raise ConfigError(f"{key}.table: a plain name (letters, digits, _), at most 48")
            if not _IDENTIFIER.fullmatch(kb.language):
                raise ConfigError(f"{key}.language: a text-search configuration's name, "
                                  "such as english or simple")
            if kb.embeddings is not None and kb.embeddings not in providers:
                raise ConfigError(f"{key}.embeddings: no [providers.{kb.embeddings}]")
        case HttpKb():
            if not _is_url(kb.url):
                raise ConfigError(f"{key}.url: expected a URL (http:// or https://)")


def _check_audio(name: str, audio: AudioConfig, providers: dict[str, ProviderConfig]) -> None:
    if isinstance(audio, OpenaiAudio) and audio.provider not in providers:
        raise ConfigError(f"audio.{name}.provider: no [providers.{audio.provider}]")


def _is_url(value: str) -> bool:
    url = URL(value) if "://" in value else None
    return url is not None and url.scheme in ("http", "https") and bool(url.host)


def _check_provider(name: str, provider: ProviderConfig) -> None:
    key = f"providers.{name}"
    if not _is_url(provider.base_url):
        raise ConfigError(f"{key}.base_url: expected a URL (http:// or https://)")
    if "/" in name:
        raise ConfigError(f"{key}: a provider name cannot contain '/'")
