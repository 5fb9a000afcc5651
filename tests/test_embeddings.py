"""Hybrid retrieval: vectors from an OpenAI-compatible /embeddings (a fake on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from llmgate.kb.chunking import Chunk
from llmgate.kb.embeddings import Embedder, fuse, nearest
from llmgate.kb.retriever import Retriever
from llmgate.kb.store import Store
from tests.test_rag import CONVERSATION, rag_client

DATA = Path(__file__).parent / "data"
# Words the fake model takes for one another: what BM25 cannot know.
SYNONYMS = {"phone": "call", "telephone": "call", "ring": "call", "number": "call",
            "costly": "price", "expensive": "price", "cheaper": "price"}
DIMS = 512


def vector(text: str) -> list[float]:
    """A bag of the longer words, synonyms as one, hashed into DIMS."""
    out = np.zeros(DIMS, np.float32)
    for word in re.findall(r"[a-z]{4,}", text.lower()):
        word = SYNONYMS.get(word, word)
        if word not in ("what", "your", "with", "from", "that", "this"):
            out[int(hashlib.md5(word.encode()).hexdigest(), 16) % DIMS] += 1.0
    return out.tolist()


class FakeEmbeddings:
    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.down = False
        self.app = web.Application()
        self.app.router.add_post("/v1/embeddings", self.embed)

    async def embed(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append({"model": body["model"], "n": len(body["input"]),
                           "auth": request.headers.get("Authorization")})
        if self.down:
            return web.json_response({"error": {"message": "down"}}, status=503)
        data = [{"object": "embedding", "index": i, "embedding": vector(t)}
                for i, t in reversed(list(enumerate(body["input"])))]  # out of order, as allowed
        return web.json_response({"object": "list", "data": data, "model": body["model"]})


@pytest.fixture
async def embeddings(aiohttp_server):
    fake = FakeEmbeddings()
    server = await aiohttp_server(fake.app)
    fake.url = str(server.make_url("/v1"))
    return fake


@pytest.fixture
def config(tmp_path, embeddings) -> Path:
    (tmp_path / "c.toml").write_text(
        f'[providers.emb]\nbase_url = "{embeddings.url}"\napi_key = "emb-secret"\n'
        '[kb.shop]\npath = "shop.sqlite"\nchunk_tokens = 60\noverlap_tokens = 10\n'
        'embeddings = "emb"\nembedding_model = "fake-embed"\n'
    )
    return tmp_path / "c.toml"


async def kb(*args: str) -> tuple[int, str]:
    """The `kb` command in a process of its own (it takes SIGINT, which only a main thread
    can), while this test's loop serves the fake endpoint: (exit code, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmgate", "kb", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, err.decode()


async def test_ingest_stores_a_vector_for_every_chunk(config, embeddings):
    code, _ = await kb("ingest", "--config", str(config), "--kb", "shop", str(DATA / "shop.md"))
    assert code == 0
    conn = sqlite3.connect(config.parent / "shop.sqlite")
    total, with_vec = conn.execute("SELECT count(*), count(vec) FROM chunks").fetchone()
    assert total == with_vec > 10
    assert {c["model"] for c in embeddings.calls} == {"fake-embed"}
    assert embeddings.calls[0]["auth"] == "Bearer emb-secret"


async def test_hybrid_finds_what_bm25_alone_misses(config, embeddings):
    await kb("ingest", "--config", str(config), "--kb", "shop", str(DATA / "shop.md"))
    path = config.parent / "shop.sqlite"
    embedder = Embedder(embeddings.url, {}, "fake-embed", 5)
    question = "What is your telephone number?"
    lexical = Retriever("shop", path)
    hybrid = Retriever("shop", path, embedder)
    try:
        bm25 = [h.heading.split(" > ")[-1] for h in await lexical.search(question, 3)]
        fused = [h.heading.split(" > ")[-1] for h in await hybrid.search(question, 3)]
    finally:
        await lexical.aclose()
        await hybrid.aclose()
    assert "Contact" not in bm25
    assert "Contact" in fused


async def test_the_rag_route_with_embeddings(make_gateway, connect, upstream, config, embeddings):
    await kb("ingest", "--config", str(config), "--kb", "shop", str(DATA / "shop.md"))
    gateway = await make_gateway(
        providers={
            "fake": {"base_url": upstream.url},
            "emb": {"base_url": embeddings.url, "api_key": "emb-secret"},
        },
        kb={"shop": {"path": str(config.parent / "shop.sqlite"), "embeddings": "emb",
                     "embedding_model": "fake-embed"}},
        rag={"shop": {"kb": "shop", "top_k": 3}},
        routes=[{"path": "/rag/chat/completions", "rag": "shop"}],
    )
    question = [{"role": "user", "content": "Can I ring you? What is the number?"}]
    await rag_client(connect, gateway).chat.completions.create(model="fake/text", messages=question)
    assert "0117 496 0000" in upstream.requests[0]["messages"][0]["content"]
    embeddings.down = True  # the question's vector fails: BM25 answers alone
    await rag_client(connect, gateway).chat.completions.create(
        model="fake/text", messages=CONVERSATION
    )
    assert "4.95 pounds" in upstream.requests[1]["messages"][3]["content"]  # before the question


async def test_embeddings_down_at_ingest_leaves_the_base_unchanged(config, embeddings):
    await kb("ingest", "--config", str(config), "--kb", "shop", str(DATA / "shop.md"))
    store = Store(config.parent / "shop.sqlite")
    before = store.stats()["chunks"], store.sources()
    store.close()
    embeddings.down = True
    extra = config.parent / "extra.md"
    extra.write_text("# Extra\n\nA new page about gardening tools.\n")
    code, err = await kb("ingest", "--config", str(config), "--kb", "shop", str(extra))
    assert code == 1
    assert "embeddings" in err
    store = Store(config.parent / "shop.sqlite")
    assert (store.stats()["chunks"], store.sources()) == before
    store.close()


def test_nearest_and_fusion():
    matrix = np.eye(4, dtype=np.float32)
    assert nearest(matrix, np.array([0, 0.2, 0.9, 0], np.float32), 2).tolist() == [2, 1]
    fused = fuse([1, 2, 3], [3, 1, 4])
    assert [chunk for chunk, _ in fused] == [1, 3, 2, 4]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)


async def test_a_base_of_another_model_is_searched_by_bm25(tmp_path):
    store = Store(tmp_path / "kb.sqlite")
    with store.transaction():
        chunk = Chunk("Refunds", "Refunds are paid within five days.")
        store.replace("/a.md", "x", 10, [chunk], [np.ones(3, np.float32).tobytes()])
    store.close()

    class FourDims(Embedder):
        async def embed(self, session, texts):
            return np.ones((len(texts), 4), np.float32) / 2

    retriever = Retriever("kb", tmp_path / "kb.sqlite", FourDims("http://x/v1", {}, "m", 1))
    try:
        [hit] = await retriever.search("refunds", 3)
    finally:
        await retriever.aclose()
    assert hit.heading == "Refunds"


async def test_kb_copy_moves_every_chunk_and_vector_without_embedding_again(config, embeddings):
    """`kb copy --from OLD.sqlite --to NAME`: the same sources, chunks, headings and vectors;
    the embeddings endpoint is not called; a second copy skips what is there."""
    await kb("ingest", "--config", str(config), "--kb", "shop", str(DATA / "shop.md"))
    with config.open("a") as toml:
        toml.write('[kb.moved]\npath = "moved.sqlite"\nembeddings = "emb"\n'
                   'embedding_model = "fake-embed"\n')
    calls = len(embeddings.calls)
    code, err = await kb("copy", "--config", str(config), "--kb", "moved",
                         "--from", str(config.parent / "shop.sqlite"))
    assert code == 0, err
    assert len(embeddings.calls) == calls

    def rows(name: str) -> list[tuple]:
        conn = sqlite3.connect(config.parent / name)
        try:
            return conn.execute(
                "SELECT s.path, s.hash, s.name, c.ord, c.heading, c.text, c.meta, c.vec "
                "FROM chunks c JOIN sources s ON s.path = c.source ORDER BY s.path, c.ord"
            ).fetchall()
        finally:
            conn.close()

    copied = rows("moved.sqlite")
    assert copied == rows("shop.sqlite") and len(copied) > 10
    assert all(row[-1] is not None for row in copied)
    code, err = await kb("copy", "--config", str(config), "--kb", "moved",
                         "--from", str(config.parent / "shop.sqlite"))
    assert code == 0 and rows("moved.sqlite") == copied
    code, err = await kb("copy", "--config", str(config), "--kb", "moved",
                         "--from", str(config.parent / "nothing.sqlite"))
    assert code == 1 and "no such knowledge base" in err
    assert not (config.parent / "nothing.sqlite").exists()
