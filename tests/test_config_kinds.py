"""[kb.NAME], [audio.NAME] and [tools.NAME]: one struct a kind, picked by `kind` / `engine`;
a key of another kind is refused by its name, and code dispatches on the struct's type."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from llmgate.config import (
    ConfigError,
    EspeakAudio,
    FileAudio,
    HttpKb,
    HttpToolConfig,
    Loaded,
    McpToolConfig,
    OpenaiAudio,
    PiperAudio,
    PostgresKb,
    SqliteKb,
    kind_of,
    load,
    parse,
)
from llmgate.kb import bases
from llmgate.kb.base import KbError
from llmgate.kb.remote import HttpRetriever
from llmgate.kb.retriever import Retriever
from llmgate.kb.store import Store
from llmgate.tools.registry import Toolbox
from llmgate.tts.engines import engine_for
from llmgate.tts.espeak import EspeakEngine
from llmgate.tts.file import FileEngine
from llmgate.tts.openai_speech import OpenAISpeechEngine
from llmgate.tts.piper import PiperEngine
from llmgate.upstream.provider import Provider
from tests.test_mcp import ServerThread, free_port

PROVIDER = {"base_url": "https://api.example.com/v1"}


def config(**sections):
    return parse({"providers": {"p": dict(PROVIDER)}, **sections}, {}).config


def refusal(**sections) -> str:
    with pytest.raises(ConfigError) as info:
        config(**sections)
    return str(info.value)


# -- what loads --------------------------------------------------------------------------------


def test_sections_without_a_kind_load_as_sqlite_and_piper(tmp_path):
    (tmp_path / "c.toml").write_text(
        '[providers.p]\nbase_url = "http://x/v1"\n'
        '[kb.docs]\npath = "kb/docs.sqlite"\nchunk_tokens = 300\n'
        '[audio.voice]\nvoice = "voices/joe.onnx"\nlead_ms = 100\n'
    )
    loaded = load(str(tmp_path / "c.toml"))
    kb, audio = loaded.config.kb["docs"], loaded.config.audio["voice"]
    assert isinstance(kb, SqliteKb) and kind_of(kb) == "sqlite"
    assert (kb.path, kb.chunk_tokens, kb.overlap_tokens) == ("kb/docs.sqlite", 300, 30)
    assert isinstance(audio, PiperAudio) and kind_of(audio) == "piper"
    assert (audio.voice, audio.lead_ms, audio.sample_rate) == ("voices/joe.onnx", 100, 16000)


def test_each_kind_loads_its_own_keys():
    loaded = config(
        kb={
            "file": {"kind": "sqlite", "path": "a.sqlite", "embeddings": "p",
                     "embedding_model": "e5"},
            "remote": {"kind": "http", "url": "http://10.0.0.5:7000/search",
                       "headers": {"Authorization": "Bearer k"}, "timeout_s": 1.5},
        },
        audio={
            "piper": {"engine": "piper", "first_words": 3},
            "espeak": {"engine": "espeak", "voice": "en-gb"},
            "cloud": {"engine": "openai", "provider": "p", "model": "tts-1", "source_rate": 22050},
            "closed": {"engine": "file", "pcm_file": "closed.pcm", "text_file": "closed.txt",
                       "file_rate": 8000},
        },
        tools={
            "weather": {"kind": "http", "url": "https://t.example.com/w", "method": "GET",
                        "description": "Weather.", "metadata": {"channel": "X-Channel"}},
            "crm": {"kind": "mcp", "url": "http://127.0.0.1:9000/mcp", "allowed": ["lookup"],
                    "max_tools": 8, "metadata": {"channel": "X-Channel"}},
        },
    )
    assert loaded.kb["file"] == SqliteKb(path="a.sqlite", embeddings="p", embedding_model="e5")
    assert loaded.kb["remote"] == HttpKb(
        url="http://10.0.0.5:7000/search", headers={"Authorization": "Bearer k"}, timeout_s=1.5
    )
    assert loaded.audio["piper"] == PiperAudio(first_words=3)
    assert loaded.audio["espeak"] == EspeakAudio(voice="en-gb")
    assert loaded.audio["cloud"] == OpenaiAudio(provider="p", model="tts-1", source_rate=22050)
    assert loaded.audio["closed"] == FileAudio(
        pcm_file="closed.pcm", text_file="closed.txt", file_rate=8000
    )
    weather, crm = loaded.tools["weather"], loaded.tools["crm"]
    assert isinstance(weather, HttpToolConfig) and weather.method == "GET"
    assert weather.metadata == {"channel": "X-Channel"}
    assert isinstance(crm, McpToolConfig) and (crm.allowed, crm.max_tools) == (["lookup"], 8)
    assert crm.metadata == {"channel": "X-Channel"}  # an MCP call sends it as headers too
    assert [kind_of(t) for t in loaded.tools.values()] == ["http", "mcp"]


# -- what is refused -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"kb": {"docs": {"path": "a", "url": "http://x"}}},
         'kb.docs.url: a key of kind = "http", not of kind = "sqlite", the default'),
        ({"kb": {"docs": {"kind": "sqlite", "path": "a", "timeout_s": 1}}},
         'kb.docs.timeout_s: a key of kind = "http", not of kind = "sqlite"'),
        ({"kb": {"docs": {"kind": "http", "url": "http://x", "path": "a"}}},
         'kb.docs.path: a key of kind = "sqlite", not of kind = "http"'),
        ({"audio": {"v": {"pcm_file": "a.pcm"}}},
         'audio.v.pcm_file: a key of engine = "file", not of engine = "piper", the default'),
        ({"audio": {"v": {"engine": "espeak", "provider": "p"}}},
         'audio.v.provider: a key of engine = "openai", not of engine = "espeak"'),
        ({"audio": {"v": {"engine": "openai", "provider": "p", "file_rate": 8000}}},
         'audio.v.file_rate: a key of engine = "file", not of engine = "openai"'),
        ({"tools": {"t": {"kind": "http", "url": "http://x", "allowed": ["a"]}}},
         'tools.t.allowed: a key of kind = "mcp", not of kind = "http"'),
        ({"tools": {"t": {"kind": "mcp", "url": "http://x", "method": "GET"}}},
         'tools.t.method: a key of kind = "http", not of kind = "mcp"'),
    ],
)
def test_a_key_of_another_kind_is_refused_by_its_name(sections, message):
    assert refusal(**sections) == message


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"kb": {"docs": {"kind": "vector"}}},
         'kb.docs.kind: expected one of "sqlite", "postgres", "http" (not "vector")'),
        ({"kb": {"docs": {"kind": 1}}},
         'kb.docs.kind: expected one of "sqlite", "postgres", "http"'),
        ({"audio": {"v": {"engine": "say"}}},
         'audio.v.engine: expected one of "piper", "espeak", "openai", "file" (not "say")'),
        ({"tools": {"t": {"kind": "grpc", "url": "http://x"}}},
         'tools.t.kind: expected one of "http", "mcp" (not "grpc")'),
        ({"tools": {"t": {"url": "http://x"}}}, 'tools.t.kind: is required (one of "http", "mcp")'),
    ],
)
def test_an_unknown_or_missing_kind_names_the_key_and_the_kinds(sections, message):
    assert refusal(**sections) == message


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"kb": {"docs": {}}}, "kb.docs.path: a sqlite knowledge base needs its file's path"),
        ({"kb": {"docs": {"kind": "http"}}}, "kb.docs.url: expected a URL"),
        ({"kb": {"docs": {"path": "a", "embeddings": "q"}}},
         "kb.docs.embeddings: no [providers.q]"),
        ({"audio": {"v": {"engine": "openai"}}}, "audio.v.provider: is required"),
        ({"audio": {"v": {"engine": "openai", "provider": "q"}}},
         "audio.v.provider: no [providers.q]"),
        ({"audio": {"v": {"engine": "file"}}}, "audio.v.pcm_file: is required"),
        ({"audio": {"v": {"engine": "file", "pcm_file": ""}}}, "audio.v.pcm_file: Expected `str`"),
        ({"tools": {"t": {"kind": "mcp"}}}, "tools.t.url: is required"),
        ({"tools": {"t": {"kind": "http", "url": "x"}}}, "tools.t.url: expected a URL"),
        ({"kb": {"docs": {"path": "a", "bogus": 1}}}, "kb.docs.bogus: is not a known field"),
        ({"audio": {"v": "piper"}}, "audio.v: Expected `object`"),
    ],
)
def test_what_each_kind_needs_names_the_key(sections, message):
    assert refusal(**sections).startswith(message)


# -- dispatch on the struct's type ---------------------------------------------------------


def test_each_engine_is_built_from_its_own_struct(tmp_path):
    loaded = Loaded(config(), base_dir=tmp_path)
    providers = {"p": Provider("p", loaded.config.providers["p"], ())}
    piper = engine_for(PiperAudio(voice="joe.onnx"), loaded, providers)
    assert isinstance(piper, PiperEngine) and piper.model == tmp_path / "joe.onnx"
    espeak = engine_for(EspeakAudio(voice="en-gb"), loaded, providers)
    assert isinstance(espeak, EspeakEngine) and espeak.voice == "en-gb"
    cloud = engine_for(OpenaiAudio(provider="p", source_rate=22050), loaded, providers)
    assert isinstance(cloud, OpenAISpeechEngine) and cloud.rate == 22050
    assert cloud.provider is providers["p"]
    closed = engine_for(FileAudio(pcm_file="c.pcm", file_rate=8000), loaded, providers)
    assert isinstance(closed, FileEngine) and closed.pcm_path == tmp_path / "c.pcm"
    assert (closed.text_path, closed.rate) == (None, 8000)


async def test_each_kb_kind_gets_its_own_reader_and_writer(tmp_path):
    loaded = Loaded(config(), base_dir=tmp_path)
    remote = bases.reader("remote", HttpKb(url="http://127.0.0.1:1/search"), loaded)
    local = bases.reader("docs", SqliteKb(path="docs.sqlite"), loaded)
    try:
        assert isinstance(remote, HttpRetriever) and isinstance(local, Retriever)
    finally:
        await remote.aclose()
        await local.aclose()
    writer = bases.writer("docs", SqliteKb(path="docs.sqlite"), loaded)
    writer.close()
    assert isinstance(writer, Store) and writer.path == tmp_path / "docs.sqlite"
    with pytest.raises(KbError, match=r'kb\.remote is a retrieval service'):
        bases.writer("remote", HttpKb(url="http://127.0.0.1:1/search"), loaded)
    pg = PostgresKb(dsn="postgresql://u:secret@db.example:5433/app", table="t1")
    assert bases.where(pg, loaded) == "postgresql db.example:5433/app table t1"


async def test_each_tool_kind_goes_where_it_is_run():
    toolbox = Toolbox({
        "weather": HttpToolConfig(url="http://127.0.0.1:1/w", metadata={"c": "X-C"}),
        "crm": McpToolConfig(url="http://127.0.0.1:1/mcp", max_tools=3, metadata={"c": "X-M"}),
    })
    try:
        assert list(toolbox.http) == ["weather"] and list(toolbox.mcp) == ["crm"]
        assert toolbox.mcp["crm"].max_tools == 3
        assert toolbox.offered(["weather"])["weather"][1] == {"c": "X-C"}
    finally:
        await toolbox.aclose()


# -- an MCP server's first connection, told (what `llmgate check` asks) ----------------------


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[ServerThread]:
    server = ServerThread().start()
    yield server
    server.stop()


async def test_a_first_listing_tells_the_tools(mcp_server):
    from llmgate.tools.mcp import McpServer

    server = McpServer("crm", mcp_server.url, {}, ["echo"], 5.0, once=True)
    await server.start()
    try:
        tools = await server.first_listing()
    finally:
        await server.aclose()
    assert [tool.spec.name for tool in tools] == ["echo"]


async def test_a_first_listing_tells_why_it_failed_without_logging_it(caplog):
    from llmgate.tools.mcp import McpServer, McpUnavailable

    url = f"http://127.0.0.1:{free_port()}/mcp?key=url-sekrit"
    server = McpServer("dead", url, {"Authorization": "Bearer hdr-sekrit"}, None, 5.0, once=True)
    caplog.set_level(logging.DEBUG, logger="llmgate.tools")
    await server.start()
    try:
        with pytest.raises(McpUnavailable) as info:
            await server.first_listing()
    finally:
        await server.aclose()
    assert "ConnectError" in str(info.value)
    assert "sekrit" not in str(info.value) and "sekrit" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_server_closed_before_it_answered_says_so():
    from llmgate.tools.mcp import McpServer, McpUnavailable

    server = McpServer("never", "http://127.0.0.1:1/mcp", {}, None, 5.0)
    await server.aclose()  # never started
    with pytest.raises(McpUnavailable, match="closed before the server answered"):
        await server.first_listing()

