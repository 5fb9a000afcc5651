"""No configured credential follows a redirect: each of llmgate's own callers is sent a 307
to another server, which must receive nothing (aiohttp drops only Authorization there; an
`api-key` or `X-Api-Key` header and the user's question would go along)."""

from __future__ import annotations

import asyncio

import pytest

from llmgate import http
from llmgate.check import main
from llmgate.config import HttpToolConfig, ProviderConfig
from llmgate.errors import ApiError
from llmgate.kb.embeddings import Embedder, EmbeddingError
from llmgate.kb.remote import HttpRetriever
from llmgate.kb.store import KbError
from llmgate.tools.base import ToolError
from llmgate.tools.http import HttpTool
from llmgate.tts.base import EngineError
from llmgate.tts.openai_speech import OpenAISpeechEngine
from llmgate.upstream import catalog
from llmgate.upstream.provider import Provider
from tests.test_check import row
from tests.test_http import SECRET, Elsewhere, Redirector, serve

QUESTION = "what is my account balance"


@pytest.fixture
async def hosts(aiohttp_server) -> tuple[Redirector, Elsewhere]:
    elsewhere = await serve(aiohttp_server, Elsewhere())
    return await serve(aiohttp_server, Redirector(elsewhere.url)), elsewhere


def provider(url: str) -> Provider:
    config = ProviderConfig(base_url=url + "/v1", api_key=SECRET, headers={"api-key": SECRET})
    return Provider("hostile", config)


async def test_an_http_tool(hosts):
    redirector, elsewhere = hosts
    config = HttpToolConfig(
        url=redirector.url + "/weather", headers={"X-Api-Key": SECRET},
        metadata={"channel": "X-Channel"},
    )
    tool = HttpTool("weather", config)
    try:
        with pytest.raises(ToolError, match=r"^tool weather answered HTTP 307$"):
            await tool.call({"question": QUESTION}, {"X-Channel": "room-7"})
    finally:
        await tool.aclose()
    assert redirector.asked == 1 and elsewhere.hits == []


async def test_the_models_refresh(hosts):
    redirector, elsewhere = hosts
    async with http.new_session() as session:
        with pytest.raises(ApiError) as caught:
            await catalog.models_of(session, provider(redirector.url))
    assert caught.value.message == "provider 'hostile' failed with HTTP 307"
    assert redirector.asked == 1 and elsewhere.hits == []


async def test_the_http_retriever(hosts):
    redirector, elsewhere = hosts
    retriever = HttpRetriever("remote", redirector.url + "/search", {"X-Api-Key": SECRET}, 5)
    try:
        said = r"^kb 'remote': the retrieval service answered HTTP 307$"
        with pytest.raises(KbError, match=said):
            await retriever.search(QUESTION, 3)
    finally:
        await retriever.aclose()
    assert redirector.asked == 1 and elsewhere.hits == []


async def test_embeddings(hosts):
    redirector, elsewhere = hosts
    embedder = Embedder(redirector.url + "/v1", {"api-key": SECRET}, "m", 5, "provider 'emb'")
    async with http.new_session() as session:
        with pytest.raises(EmbeddingError, match=r"^provider 'emb'/embeddings answered HTTP 307$"):
            await embedder.embed(session, [QUESTION])
    assert redirector.asked == 1 and elsewhere.hits == []


async def test_the_speech_endpoint(hosts):
    redirector, elsewhere = hosts
    engine = OpenAISpeechEngine(provider(redirector.url), "tts-1", "alloy", 24000)
    try:
        with pytest.raises(EngineError, match=r"^provider 'hostile' failed with HTTP 307$"):
            async for _ in engine.synthesize(QUESTION):
                pass
    finally:
        await engine.aclose()
    assert redirector.asked == 1 and elsewhere.hits == []


async def test_check(hosts, tmp_path, capsys):
    """Its provider probe, its retrieval, and its tool HEAD (any status is 'reachable')."""
    redirector, elsewhere = hosts
    (tmp_path / "c.toml").write_text(f"""
[providers.hostile]
base_url = "{redirector.url}/v1"
api_key = "{SECRET}"
headers = {{ api-key = "{SECRET}" }}
[kb.remote]
kind = "http"
url = "{redirector.url}/search"
headers = {{ X-Api-Key = "{SECRET}" }}
[tools.weather]
kind = "http"
url = "{redirector.url}/weather"
headers = {{ X-Api-Key = "{SECRET}" }}
[[routes]]
path = "/chat/completions"
tools = ["weather"]
""")
    code = await asyncio.to_thread(main, ["--config", str(tmp_path / "c.toml")])
    out = capsys.readouterr().out
    assert code == 1
    assert row(out, "provider hostile")[0] == "FAIL"
    assert row(out, "provider hostile")[1].endswith("provider 'hostile' failed with HTTP 307")
    assert row(out, "kb remote")[1].endswith("the retrieval service answered HTTP 307")
    assert row(out, "tool weather")[1].endswith("reachable (HTTP 307 to HEAD)")
    assert redirector.asked == 3 and elsewhere.hits == []
    assert SECRET not in out
