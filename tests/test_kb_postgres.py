"""A knowledge base in PostgreSQL with pgvector: a real server (tests/pg_server.py), started
by the suite on 127.0.0.1 from the `pgserver` wheel's binaries."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from llmgate.app import LIVE
from llmgate.config import PostgresKb
from llmgate.kb.base import KbError, KbMissing
from llmgate.kb.embeddings import Embedder
from llmgate.kb.ingest import ingest
from llmgate.kb.postgres import PgReader, PgWriter, describe
from llmgate.kb.store import Store
from llmgate.stages.rag import NOTHING_FOUND, query_text
from tests.conftest import API_KEY, eventually
from tests.pg_server import PgServer, pg_server  # noqa: F401 (fixture)
from tests.test_embeddings import FakeEmbeddings, embeddings, kb  # noqa: F401 (fixture)
from tests.test_kb import QUESTIONS

DATA = Path(__file__).parent / "data"
HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
_tables = iter(range(10**6))


def table() -> str:
    """A table of its own for each test (one server for the whole run)."""
    return f"t{os.getpid()}_{next(_tables)}"


@pytest.fixture(scope="module")
def shop(pg_server):  # noqa: F811
    base = PostgresKb(dsn=pg_server.dsn, table="shop_questions")
    writer = PgWriter("shop", base)
    try:
        ingest(writer, [DATA / "shop.md"], 60, 10)
    finally:
        writer.close()
    return base


@pytest.mark.parametrize(("turns", "heading"), QUESTIONS)
async def test_the_right_passage_is_in_the_top_three(shop, turns, heading):
    """The question set SQLite answers (tests/test_kb.py), answered as well from PostgreSQL."""
    reader = PgReader("shop", shop)
    await reader.start()
    try:
        messages = [{"role": "user", "content": t} for t in turns]
        hits = await reader.search(query_text(messages, 2), 3)
    finally:
        await reader.aclose()
    assert heading in [h.heading.split(" > ")[-1] for h in hits]
    assert all(h.source == "shop.md" and h.text and h.score > 0 for h in hits)


async def test_hybrid_finds_what_lexical_misses(pg_server, embeddings):  # noqa: F811
    """The same fake /embeddings as SQLite's hybrid test: HNSW's list fused with the lexical."""
    base = PostgresKb(dsn=pg_server.dsn, table=table(), embeddings="emb")
    writer = await asyncio.to_thread(PgWriter, "shop", base)
    embedder = Embedder(embeddings.url, {}, "fake-embed", 5)
    try:
        await asyncio.to_thread(ingest, writer, [DATA / "shop.md"], 60, 10, embedder=embedder)
    finally:
        await asyncio.to_thread(writer.close)
    assert pg_server.psql(f"SELECT count(*) FROM pg_indexes WHERE indexname = "
                          f"'{base.table}_vec' AND indexdef LIKE '%hnsw%'") == "1"
    question = "What is your telephone number?"
    lexical, hybrid = PgReader("shop", base), PgReader("shop", base, embedder)
    try:
        await lexical.start()
        await hybrid.start()
        alone = [h.heading.split(" > ")[-1] for h in await lexical.search(question, 3)]
        fused = [h.heading.split(" > ")[-1] for h in await hybrid.search(question, 3)]
    finally:
        await lexical.aclose()
        await hybrid.aclose()
    assert "Contact" not in alone
    assert "Contact" in fused


def _pg_config(tmp_path: Path, dsn: str, name: str, extra: str = "") -> Path:
    (tmp_path / "c.toml").write_text(
        '[providers.a]\nbase_url = "http://127.0.0.1:9/v1"\n'
        f'[kb.docs]\nkind = "postgres"\ndsn = "{dsn}"\ntable = "{name}"\nchunk_tokens = 60\n'
        f"overlap_tokens = 10\n{extra}"
    )
    return tmp_path / "c.toml"


def _consistent(server: PgServer, name: str) -> tuple[int, int]:
    """(sources, chunks), after checking that every source is whole: its rows are as many
    as its `chunks` says, and no chunk is without its source."""
    broken = server.psql(
        f"SELECT count(*) FROM {name}_sources s WHERE s.chunks <> "
        f"(SELECT count(*) FROM {name} c WHERE c.source = s.path)"
    )
    orphans = server.psql(
        f"SELECT count(*) FROM {name} c WHERE NOT EXISTS "
        f"(SELECT 1 FROM {name}_sources s WHERE s.path = c.source)"
    )
    assert (broken, orphans) == ("0", "0")
    return tuple(int(x) for x in server.psql(
        f"SELECT count(*), coalesce(sum(chunks), 0) FROM {name}_sources").split("|"))


async def test_ingest_is_idempotent_and_a_changed_file_replaced(pg_server, tmp_path):  # noqa: F811
    name = table()
    config = _pg_config(tmp_path, pg_server.dsn, name)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Alpha\n\nThe alpaca grazes on the hill.\n")
    (docs / "b.md").write_text("# Beta\n\nThe beaver builds a dam.\n")
    code, err = await kb("ingest", "--config", str(config), "--kb", "docs", str(docs))
    assert code == 0, err
    assert _consistent(pg_server, name) == (2, 2)
    code, _ = await kb("ingest", "--config", str(config), "--kb", "docs", str(docs))
    assert code == 0 and _consistent(pg_server, name) == (2, 2)
    assert pg_server.psql(f"SELECT count(*) FROM {name}") == "2"  # nothing twice
    (docs / "a.md").write_text("# Alpha\n\nThe aardvark digs.\n\n# Gamma\n\nA gazelle runs.\n")
    code, _ = await kb("ingest", "--config", str(config), "--kb", "docs", str(docs))
    assert code == 0 and _consistent(pg_server, name) == (2, 3)
    assert "alpaca" not in pg_server.psql(f"SELECT string_agg(text, ' ') FROM {name}")
    code, err = await kb("stats", "--config", str(config), "--kb", "docs")
    assert code == 0
    code, err = await kb("remove", "--config", str(config), "--kb", "docs", str(docs / "b.md"))
    assert code == 0 and _consistent(pg_server, name) == (1, 2)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
async def test_a_killed_ingest_leaves_every_source_whole_or_absent(pg_server, tmp_path, sig):  # noqa: F811
    """Killed (no handler runs: mid-COPY, mid-transaction) or Ctrl-C (one line, exit 130)."""
    name = table()
    config = _pg_config(tmp_path, pg_server.dsn, name)
    docs = tmp_path / "docs"
    docs.mkdir()
    paragraph = " ".join(f"word{i} lorem ipsum dolor sit amet" for i in range(400))
    for i in range(300):
        (docs / f"f{i:03}.md").write_text(f"# File {i}\n\n{paragraph}\n\n" * 3)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmgate", "kb", "ingest", "--config", str(config), "--kb", "docs",
        str(docs), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )

    def some() -> bool:
        try:
            return int(pg_server.psql(f"SELECT count(*) FROM {name}_sources")) >= 3
        except Exception:
            return False

    await eventually(some, timeout=30)
    proc.send_signal(sig)
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert err.decode().strip() == ("llmgate: interrupted; every source is whole or absent "
                                        "(each is written in one transaction)")
    done, _ = _consistent(pg_server, name)
    assert 3 <= done < 300
    code, err = await kb("ingest", "--config", str(config), "--kb", "docs", str(docs))
    assert code == 0, err
    assert _consistent(pg_server, name)[0] == 300


async def test_kb_copy_keeps_every_chunk_and_vector(pg_server, tmp_path, embeddings):  # noqa: F811
    """A SQLite base with vectors, moved into PostgreSQL without embedding again."""
    name = table()
    config = _pg_config(tmp_path, pg_server.dsn, name, 'embeddings = "emb"\n'
                        'embedding_model = "fake-embed"\n')
    with config.open("a") as toml:
        toml.write(f'[providers.emb]\nbase_url = "{embeddings.url}"\n'
                   '[kb.old]\npath = "old.sqlite"\nchunk_tokens = 60\noverlap_tokens = 10\n'
                   'embeddings = "emb"\nembedding_model = "fake-embed"\n')
    code, err = await kb("ingest", "--config", str(config), "--kb", "old", str(DATA / "shop.md"))
    assert code == 0, err
    calls = len(embeddings.calls)
    code, err = await kb("copy", "--config", str(config), "--kb", "docs",
                         "--from", str(tmp_path / "old.sqlite"))
    assert code == 0, err
    assert len(embeddings.calls) == calls  # not embedded again
    old = Store(tmp_path / "old.sqlite")
    moved = PgWriter("docs", PostgresKb(dsn=pg_server.dsn, table=name))
    try:
        before, after = list(old.export()), list(moved.export())
    finally:
        old.close()
        moved.close()
    assert [(e.path, e.digest, e.size, e.name) for e in after] == [
        (e.path, e.digest, e.size, e.name) for e in before]
    assert [e.chunks for e in after] == [e.chunks for e in before]
    assert sum(len(e.chunks) for e in after) > 10
    assert all(e.vectors is not None for e in after)
    assert [e.vectors for e in after] == [e.vectors for e in before]  # bit for bit
    code, err = await kb("copy", "--config", str(config), "--kb", "docs",
                         "--from", str(tmp_path / "old.sqlite"))
    assert code == 0 and _consistent(pg_server, name) == (1, sum(len(e.chunks) for e in after))


async def _turn(gateway, question: str) -> tuple[str, float]:
    """The seconds a turn on the RAG route took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    body = {"model": "text", "messages": [{"role": "user", "content": question}]}
    async with aiohttp.ClientSession() as session, session.post(
        gateway.make_url("/rag/chat/completions"), json=body, headers=HEADERS
    ) as resp:
        assert resp.status == 200
        await resp.read()
    return loop.time() - start


async def test_postgres_down_is_nothing_found_in_time_and_back_after(make_gateway, upstream,
                                                                      tmp_path, caplog):
    server = PgServer()
    server.start()
    try:
        base = {"kind": "postgres", "dsn": server.dsn, "table": "shop", "timeout_ms": 300}
        writer = await asyncio.to_thread(PgWriter, "shop", PostgresKb(**{
            k: v for k, v in base.items() if k != "kind"}))
        await asyncio.to_thread(ingest, writer, [DATA / "shop.md"], 60, 10)
        await asyncio.to_thread(writer.close)
        gateway = await make_gateway(kb={"shop": base}, rag={"shop": {"kb": "shop"}},
                                     routes=[{"path": "/rag/chat/completions", "rag": "shop"}])
        question = "Can I bring my dog?"
        await _turn(gateway, question)
        assert "guide dogs" in upstream.requests[-1]["messages"][0]["content"].lower()
        server.stop()  # mid-run: the pool's connections end
        for _ in range(3):
            took = await _turn(gateway, question)
            assert upstream.requests[-1]["messages"][0]["content"] == NOTHING_FOUND
            assert took < 2.0  # (a hang would take the client's 10 s)
        server.start()  # back: the pool connects again at the next turn

        async def back() -> bool:
            await _turn(gateway, question)
            return "guide dogs" in upstream.requests[-1]["messages"][0]["content"].lower()

        for _ in range(50):
            if await back():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("retrieval did not come back")
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "pw-not-shown" not in logged and server.dsn not in logged
    finally:
        server.remove()


async def test_postgres_down_at_start_up_does_not_stop_llmgate(make_gateway, upstream, caplog):
    server = PgServer()  # made, never started: nothing listens on its port
    try:
        base = {"kind": "postgres", "dsn": server.dsn, "table": "shop"}
        gateway = await make_gateway(kb={"shop": base}, rag={"shop": {"kb": "shop"}},
                                     routes=[{"path": "/rag/chat/completions", "rag": "shop"}])
        await _turn(gateway, "Can I bring my dog?")
        assert upstream.requests[-1]["messages"][0]["content"] == NOTHING_FOUND
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert f"postgresql 127.0.0.1:{server.port}/postgres table shop" in logged
        assert "cannot connect" in logged and "pw-not-shown" not in logged
        server.start()  # the base comes up (and is filled) after llmgate
        writer = await asyncio.to_thread(PgWriter, "shop", PostgresKb(dsn=server.dsn,
                                                                      table="shop"))
        await asyncio.to_thread(ingest, writer, [DATA / "shop.md"], 60, 10)
        await asyncio.to_thread(writer.close)
        for _ in range(50):  # the pool is tried again, at most once a second
            await _turn(gateway, "Can I bring my dog?")
            if "guide dogs" in upstream.requests[-1]["messages"][0]["content"].lower():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("retrieval did not come back")
    finally:
        server.remove()


async def test_a_barge_in_cancels_the_query_on_the_server(pg_server, make_gateway, upstream):  # noqa: F811
    name = table()
    base = {"kind": "postgres", "dsn": pg_server.dsn, "table": name, "timeout_ms": 20_000}
    writer = await asyncio.to_thread(PgWriter, "shop", PostgresKb(dsn=pg_server.dsn, table=name))
    await asyncio.to_thread(ingest, writer, [DATA / "shop.md"], 60, 10)
    await asyncio.to_thread(writer.close)
    gateway = await make_gateway(kb={"shop": base}, rag={"shop": {"kb": "shop"}},
                                 routes=[{"path": "/rag/chat/completions", "rag": "shop"}])
    gateway.app[LIVE].current.retrievers["shop"].delay_s = 30  # the test hook: pg_sleep(30)
    sleeping = ("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep%' "
                "AND state = 'active' AND pid <> pg_backend_pid()")
    body = {"model": "text", "stream": True,
            "messages": [{"role": "user", "content": "Can I bring my dog?"}]}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(gateway.make_url("/rag/chat/completions"), json=body,
                                  headers=HEADERS)
        await eventually(lambda: pg_server.psql(sleeping) == "1", timeout=10)
        resp.close()  # the caller barges in
    await eventually(lambda: pg_server.psql(sleeping) == "0", timeout=3)
    assert not upstream.requests  # the turn ended there


async def test_a_base_made_by_a_newer_llmgate_is_refused(pg_server):  # noqa: F811
    name = table()
    base = PostgresKb(dsn=pg_server.dsn, table=name)
    await asyncio.to_thread(lambda: PgWriter("docs", base).close())
    pg_server.psql(f"UPDATE llmgate_kb_meta SET version = 99 WHERE base = '{name}'")
    with pytest.raises(KbError, match="made by a newer llmgate") as info:
        await asyncio.to_thread(PgWriter, "docs", base)
    assert "pw-not-shown" not in str(info.value) and describe(base) in str(info.value)
    reader = PgReader("docs", base)
    with pytest.raises(KbError, match="newer llmgate"):
        await reader.probe()
    await reader.aclose()


async def test_probe_says_what_a_base_holds_or_what_to_do(pg_server, shop):  # noqa: F811
    reader = PgReader("shop", shop)
    try:
        assert await reader.probe() == "14 chunks from 1 source"
    finally:
        await reader.aclose()
    empty = PgReader("none", PostgresKb(dsn=pg_server.dsn, table=table()))
    with pytest.raises(KbMissing):
        await empty.probe()
    await empty.aclose()
    wrong = PostgresKb(dsn=pg_server.dsn.replace(f":{pg_server.port}/", ":1/"), table="x")
    unreachable = PgReader("far", wrong)
    with pytest.raises(KbError) as info:
        await unreachable.probe()
    await unreachable.aclose()
    assert "postgresql 127.0.0.1:1/postgres table x" in str(info.value)
    assert "pw-not-shown" not in str(info.value) and "cannot connect" in str(info.value)


def test_a_vector_keeps_every_bit_through_pgvector_binary_form():
    from llmgate.kb.postgres import _vector_in, _vector_out

    vec = np.random.default_rng(1).standard_normal(7).astype(np.float32)
    assert _vector_out(_vector_in(vec.tobytes())) == vec.tobytes()
    assert json.loads(json.dumps(np.frombuffer(_vector_out(_vector_in(vec)), "<f4").tolist()))


async def test_check_probes_a_postgres_base(pg_server, shop, tmp_path, capsys):  # noqa: F811
    from tests.test_check import check, provider, row, write

    down = pg_server.dsn.replace(f":{pg_server.port}/", ":1/")
    config = provider("p", "http://127.0.0.1:1/v1") + f"""
[kb.shop]
kind = "postgres"
dsn = "{pg_server.dsn}"
table = "{shop.table}"
[kb.fresh]
kind = "postgres"
dsn = "{pg_server.dsn}"
table = "{table()}"
[kb.away]
kind = "postgres"
dsn = "{down}"
"""
    path = write(tmp_path, config)
    code, out = await check(capsys, path)
    assert code == 1
    status, detail = row(out, "kb shop")
    assert status == "ok" and detail.endswith("14 chunks from 1 source")
    status, detail = row(out, "kb fresh")
    assert status == "FAIL" and "does not exist yet" in detail
    assert f"python -m llmgate kb ingest --config {path} --kb fresh" in detail
    status, detail = row(out, "kb away")
    assert status == "FAIL" and "postgresql 127.0.0.1:1/postgres table llmgate_docs" in detail
    assert "pw-not-shown" not in out


async def test_a_running_reader_takes_up_vectors_added_later(pg_server, embeddings, monkeypatch):  # noqa: F811
    """A base made lexical, given vectors by a later `kb ingest` while the server runs:
    the server's reader reads the base's row again (every META_S) and goes hybrid."""
    from llmgate.kb import postgres

    monkeypatch.setattr(postgres, "META_S", 0.0)
    base = PostgresKb(dsn=pg_server.dsn, table=table())
    writer = await asyncio.to_thread(PgWriter, "shop", base)
    await asyncio.to_thread(ingest, writer, [DATA / "shop.md"], 60, 10)
    await asyncio.to_thread(writer.close)
    embedder = Embedder(embeddings.url, {}, "fake-embed", 5)
    reader = PgReader("shop", base, embedder)
    await reader.start()
    try:
        question = "What is your telephone number?"
        before = [h.heading.split(" > ")[-1] for h in await reader.search(question, 3)]
        writer = await asyncio.to_thread(PgWriter, "shop", base)
        await asyncio.to_thread(ingest, writer, [DATA / "shop.md"], 60, 10, embedder=embedder)
        await asyncio.to_thread(writer.close)
        after = [h.heading.split(" > ")[-1] for h in await reader.search(question, 3)]
    finally:
        await reader.aclose()
    assert "Contact" not in before
    assert "Contact" in after
