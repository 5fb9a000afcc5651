"""Every outbound answer is read to a bound: each of llmgate's own callers is sent a chunked
answer (no Content-Length) of 128 MB, and fails cleanly (or, for a tool's result, is cut)
while the server manages to write little more than the bound before the read stops."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from llmgate import http
from llmgate.check import MAX_ANSWER, main
from llmgate.config import HttpToolConfig, ProviderConfig
from llmgate.errors import ApiError
from llmgate.kb import embeddings, remote
from llmgate.kb.embeddings import Embedder, EmbeddingError
from llmgate.kb.remote import HttpRetriever
from llmgate.kb.store import KbError
from llmgate.tools.base import MAX_RESULT
from llmgate.tools.http import HttpTool
from llmgate.tts.base import EngineError
from llmgate.tts.openai_speech import OpenAISpeechEngine
from llmgate.upstream import catalog
from llmgate.upstream.provider import Provider
from tests.test_check import row
from tests.test_http import SECRET, Flood, serve


@pytest.fixture
async def make_flood(aiohttp_server):
    async def make(**kwargs) -> Flood:
        return await serve(aiohttp_server, Flood(**kwargs))

    return make


def provider(url: str) -> Provider:
    return Provider("hostile", ProviderConfig(base_url=url + "/v1", api_key=SECRET))


async def test_an_http_tools_result_is_cut(make_flood):
    flood = await make_flood(content_type="text/plain")
    tool = HttpTool("lookup", HttpToolConfig(url=flood.url + "/lookup"))
    try:
        result = await tool.call({"q": "x"}, {})
    finally:
        await tool.aclose()
    assert result == "7" * MAX_RESULT + " [result cut]"
    await flood.stopped_near(4 * MAX_RESULT)


async def test_embeddings_fail(make_flood):
    flood = await make_flood(prefix=b'{"data": [{"embedding": [')
    embedder = Embedder(flood.url + "/v1", {}, "m", 10, "provider 'emb'")
    async with http.new_session() as session:
        with pytest.raises(EmbeddingError) as caught:
            await embedder.embed(session, ["one question"])
    assert str(caught.value) == "provider 'emb'/embeddings answered more than 320 KB"
    await flood.stopped_near(embeddings.MAX_ANSWER_BASE + embeddings.MAX_ANSWER_PER_TEXT)


async def test_the_http_retriever_fails(make_flood):
    flood = await make_flood(prefix=b'{"passages": [{"text": "')
    retriever = HttpRetriever("remote", flood.url + "/search", {}, 10)
    try:
        with pytest.raises(KbError) as caught:
            await retriever.search("a question", 3)
    finally:
        await retriever.aclose()
    assert str(caught.value) == "kb 'remote': the retrieval service answered more than 4 MB"
    await flood.stopped_near(remote.MAX_ANSWER)


async def test_the_speech_endpoints_error_body_is_cut(make_flood):
    flood = await make_flood(status=500, prefix=b'{"error": {"message": "')
    engine = OpenAISpeechEngine(provider(flood.url), "tts-1", "alloy", 24000)
    try:
        with pytest.raises(EngineError) as caught:
            async for _ in engine.synthesize("Hello."):
                pass
    finally:
        await engine.aclose()
    assert str(caught.value) == "provider 'hostile' failed with HTTP 500"
    await flood.stopped_near(http.MAX_ERROR_BODY)


async def test_a_model_list_fails(make_flood):
    flood = await make_flood(prefix=b'{"data": [{"id": "')
    async with http.new_session() as session:
        with pytest.raises(ApiError) as caught:
            await catalog.models_of(session, provider(flood.url))
    assert caught.value.status == 502
    assert caught.value.message == "provider 'hostile' answered more than 4 MB"
    await flood.stopped_near(catalog.MAX_BODY)


async def test_check_fails_its_probes(make_flood, aiohttp_server, tmp_path, capsys):
    """The model list, the 1-token completion of a provider without one, a retrieval."""
    lists = await make_flood(prefix=b'{"data": [')
    completes = await make_flood(prefix=b'{"choices": [')
    retrieves = await make_flood(prefix=b'{"passages": [')

    async def no_models(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    sparse = web.Application()
    sparse.router.add_get("/v1/models", no_models)
    sparse.router.add_post("/v1/chat/completions", completes.any)
    sparse_url = str((await aiohttp_server(sparse)).make_url(""))
    (tmp_path / "c.toml").write_text(f"""
[providers.lister]
base_url = "{lists.url}/v1"
[providers.sparse]
base_url = "{sparse_url}/v1"
default_model = "tiny"
[kb.remote]
kind = "http"
url = "{retrieves.url}/search"
""")
    code = await asyncio.to_thread(main, ["--config", str(tmp_path / "c.toml"), "--timeout", "20"])
    out = capsys.readouterr().out
    assert code == 1
    assert row(out, "provider lister")[0] == "FAIL"
    assert row(out, "provider lister")[1].endswith("provider 'lister' answered more than 4 MB")
    assert row(out, "provider sparse")[0] == "FAIL"
    assert row(out, "provider sparse")[1].endswith("provider 'sparse' answered more than 64 KB")
    assert row(out, "kb remote")[1].endswith("the retrieval service answered more than 4 MB")
    await lists.stopped_near(catalog.MAX_BODY)
    await completes.stopped_near(MAX_ANSWER)
    await retrieves.stopped_near(remote.MAX_ANSWER)
