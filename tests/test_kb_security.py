"""Hostile input to the knowledge base: symlinks out of the folder, an ingest killed
midway, a writer holding the base, huge paragraphs and words, bad .jsonl, escape
sequences in a document."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest
from aiohttp import web

from llmgate.kb import chunking
from llmgate.kb.chunking import Section, chunk_sections, markdown_sections
from llmgate.kb.ingest import ingest
from llmgate.kb.retriever import Retriever
from llmgate.kb.store import Store
from tests.test_kb import kb_state, run_kb

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
KB = ("--config", "c.toml", "--kb", "docs")


def base_bytes(folder: Path) -> bytes:
    """Everything the base holds on disk, its WAL included."""
    return b"".join(p.read_bytes() for p in (folder / "kb").glob("docs.sqlite*"))


# 1. symlinks


def test_symlinks_out_of_the_folder_are_skipped_and_named(kb_config, monkeypatch):
    monkeypatch.setenv("KB_TEST_SECRET", "env-secret-4242")  # what /proc/self/environ holds
    outside = kb_config / "private"
    outside.mkdir()
    (outside / "secret.txt").write_text("password hunter2 for the vault")
    docs = kb_config / "docs"
    docs.mkdir()
    (docs / "ok.txt").write_text("The ferry leaves at dawn.")
    (docs / "notes.txt").symlink_to(outside / "secret.txt")
    (docs / "env.txt").symlink_to("/proc/self/environ")
    (docs / "linked").symlink_to(outside)  # a folder
    (docs / "inside.txt").symlink_to(docs / "ok.txt")  # even one that stays inside

    result = run_kb("ingest", *KB, str(docs), cwd=kb_config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1 files ingested")
    for name in ("notes.txt", "env.txt", "linked", "inside.txt"):
        assert f"{name}: symlink" in result.stderr, name
    assert "Traceback" not in result.stderr
    stored = base_bytes(kb_config)
    assert b"hunter2" not in stored and b"env-secret-4242" not in stored

    # a file named by itself (a shell glob names each) is no different
    named = run_kb("ingest", *KB, str(docs / "env.txt"), cwd=kb_config)
    assert named.returncode == 0 and "env.txt: symlink" in named.stderr
    assert b"env-secret-4242" not in base_bytes(kb_config)

    # --follow-symlinks: links go in, but never anything in /proc, /sys or /dev
    followed = run_kb("ingest", *KB, "--follow-symlinks", str(docs), cwd=kb_config)
    assert followed.returncode == 0, followed.stderr
    assert "env.txt: resolves into /proc" in followed.stderr
    stored = base_bytes(kb_config)
    assert b"hunter2" in stored and b"env-secret-4242" not in stored
    (docs / "dev").symlink_to("/dev")
    (docs / "zero").symlink_to("/dev/zero")
    guarded = run_kb("ingest", *KB, "--follow-symlinks", str(docs), cwd=kb_config)
    assert guarded.returncode == 0, guarded.stderr
    assert "dev: resolves into /dev" in guarded.stderr
    assert "zero: resolves into /dev" in guarded.stderr


def test_a_symlink_loop_is_walked_once(kb_config):
    docs = kb_config / "docs"
    (docs / "a").mkdir(parents=True)
    (docs / "a" / "t.txt").write_text("loops are walked once")
    (docs / "a" / "back").symlink_to(docs)
    result = run_kb("ingest", *KB, "--follow-symlinks", str(docs), cwd=kb_config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1 files ingested")


# 2. an ingest killed midway, a writer holding the base

WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from llmgate.kb.chunking import Chunk
    from llmgate.kb.store import Store

    store = Store(Path(sys.argv[1]))
    store.conn.execute("PRAGMA cache_size = 5")  # pages spill to the file before COMMIT
    with store.transaction():
        chunks = [Chunk("", f"killed midway words {i} " * 40) for i in range(3000)]
        store.replace("/tmp/big.txt", "x", 1, chunks)
        print("writing", flush=True)
        time.sleep(60)
    """
)


def start_writer(path: Path) -> subprocess.Popen:
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert writer.stdout is not None and writer.stdout.readline() == "writing\n"
    return writer


@pytest.fixture
def shop(tmp_path) -> Path:
    store = Store(tmp_path / "kb.sqlite")
    ingest(store, [DATA / "shop.md"], 60, 10)
    store.close()
    return tmp_path / "kb.sqlite"


async def test_a_killed_ingest_leaves_a_base_the_server_reads(shop):
    writer = start_writer(shop)
    journals = [p for p in shop.parent.iterdir() if p.name != shop.name]
    assert any(p.stat().st_size for p in journals)  # the write really reached the disk
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    retriever = Retriever("shop", shop)
    try:
        hits = await retriever.search("refund delivery", 3)
        assert hits and all("killed midway" not in h.text for h in hits)
    finally:
        await retriever.aclose()


async def test_a_search_never_waits_on_a_writer(shop):
    writer = start_writer(shop)
    retriever = Retriever("shop", shop)
    try:
        started = time.monotonic()
        hits = await retriever.search("refund delivery", 3)
        assert time.monotonic() - started < 1.0
        assert hits
    finally:
        writer.kill()
        writer.wait()
        await retriever.aclose()


async def test_an_unreadable_base_is_an_error_that_says_what_to_do(
    make_gateway, connect, tmp_path, caplog, upstream
):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database at all" * 200)
    gateway = await make_gateway(
        kb={"shop": {"path": str(bad)}},
        rag={"shop": {"kb": "shop", "waiting": {"phrases": []}}},
        routes=[{"path": "/rag/chat/completions", "rag": "shop"}],
    )
    client = connect(gateway).with_options(base_url=str(gateway.make_url("/rag")))
    await client.chat.completions.create(
        model="text", messages=[{"role": "user", "content": "refunds please"}]
    )
    [record] = [r for r in caplog.records if r.name == "llmgate.rag"]
    assert record.levelno == logging.ERROR
    assert "bad.sqlite" in record.getMessage() and "kb ingest" in record.getMessage()


# 3. long paragraphs, big files, Ctrl-C


def cpu_seconds(text: str) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        chunk_sections(markdown_sections(text), 200, 30)
        best = min(best, time.process_time() - started)
    return best


def one_paragraph(megabytes: float) -> str:
    words = [f"word{i % 1000}" for i in range(int(megabytes * 2**20 / 8))]
    return " ".join(words)


def test_a_long_paragraph_is_chunked_in_linear_time_and_memory():
    small, large = one_paragraph(0.5), one_paragraph(2)
    # quadratic work would take 16 times as long for 4 times the text; linear about 4
    assert cpu_seconds(large) < 8 * cpu_seconds(small)
    tracemalloc.start()
    try:
        chunks = chunk_sections(markdown_sections(large), 200, 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert chunks and peak < 5 * len(large)  # the chunks themselves are ~1.2x


def test_a_file_over_the_cap_is_skipped_with_a_warning(kb_config):
    docs = kb_config / "docs"
    docs.mkdir()
    (docs / "big.txt").write_text(one_paragraph(2.2))
    (docs / "small.txt").write_text("The ferry leaves at dawn.")
    result = run_kb("ingest", *KB, "--max-file-mb", "2", str(docs), cwd=kb_config)
    assert result.returncode == 0, result.stderr
    assert "big.txt: too large" in result.stderr and "--max-file-mb" in result.stderr
    assert result.stdout.startswith("1 files ingested")
    raised = run_kb("ingest", *KB, "--max-file-mb", "3", str(docs), cwd=kb_config)
    assert raised.returncode == 0 and raised.stdout.startswith("1 files ingested (1 unchanged)")


def wal_size(folder: Path) -> int:
    wal = folder / "kb" / "docs.sqlite-wal"
    return wal.stat().st_size if wal.exists() else 0


@pytest.mark.parametrize("during", ["chunking", "indexing"])
def test_ctrl_c_stops_an_ingest_at_once_with_one_line(kb_config, during):
    docs = kb_config / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The ferry leaves at dawn.")
    run_kb("ingest", *KB, str(docs), cwd=kb_config)
    before = kb_state(kb_config)
    (docs / "huge.txt").write_text(one_paragraph(80))  # chunked for ~8 s
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmgate", "kb", "ingest", *KB, "--max-file-mb", "100",
         str(docs)],
        cwd=kb_config, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if during == "chunking":
        time.sleep(2.5)
    else:  # SQLite indexes the chunks: one statement of seconds
        deadline = time.monotonic() + 60
        while wal_size(kb_config) < 160 * 2**20 and time.monotonic() < deadline:  # FTS5
            time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert time.monotonic() - sent < 2.0, err
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["llmgate: interrupted; the knowledge base is unchanged"]
    assert kb_state(kb_config) == before


# 4. passages bounded in characters


def test_a_word_longer_than_a_chunk_is_cut():
    text = "before " + "x" * 100_000 + " after"
    chunks = chunk_sections([Section("", text)], 200, 30)
    limit = 200 * chunking.CHARS_PER_WORD
    assert all(len(c.text) <= limit for c in chunks)
    assert sum(c.text.count("x") for c in chunks) >= 100_000
    assert chunks[0].text.startswith("before") and chunks[-1].text.endswith("after")


def test_data_uris_are_dropped_at_ingest(tmp_path):
    image = "data:image/png;base64," + "iVBORw0KGgo" * 400_000  # 4.4 MB
    page = tmp_path / "page.md"
    page.write_text(f"# Logo\n\nOur logo ![the logo]({image}) is blue.\n\nSee <{image}>.\n")
    store = Store(tmp_path / "kb.sqlite")
    summary = ingest(store, [page], 200, 30)
    assert summary.chunks == 1
    [hit] = store.search("logo", 3)
    assert "base64" not in hit.text and "iVBOR" not in hit.text
    assert "the logo" in hit.text and "is blue" in hit.text


async def test_the_passage_block_is_capped(aiohttp_server, make_gateway, connect, upstream):
    async def search(request: web.Request) -> web.Response:
        huge = [{"text": "refund " * 150_000, "source": "a.md"},
                {"text": "second passage", "source": "b.md"}]
        return web.json_response({"passages": huge})

    app = web.Application()
    app.router.add_post("/search", search)
    service = await aiohttp_server(app)
    gateway = await make_gateway(
        kb={"remote": {"kind": "http", "url": str(service.make_url("/search"))}},
        rag={"remote": {"kb": "remote", "max_context_tokens": 500, "waiting": {"phrases": []}}},
        routes=[{"path": "/rag/chat/completions", "rag": "remote"}],
    )
    client = connect(gateway).with_options(base_url=str(gateway.make_url("/rag")))
    await client.chat.completions.create(
        model="text", messages=[{"role": "user", "content": "refunds?"}]
    )
    system = upstream.requests[0]["messages"][0]["content"]
    assert "[1] (a.md)\nrefund refund" in system
    assert len(system) < 500 * 4 + 600  # the budget and llmgate's own words


# 5. bad .jsonl lines, escape sequences


def test_bad_jsonl_lines_are_named_and_skipped(kb_config):
    docs = kb_config / "docs"
    docs.mkdir()
    lines = [
        json.dumps({"text": "The ferry leaves at dawn."}),
        "{nope",
        "[1, 2, 3]",
        '"just a string"',
        json.dumps({"text": 42}),
        json.dumps({"body": "no text field"}),
        "[" * 100_000 + "]" * 100_000,
        '{"text": 1' + "0" * 5000 + "}",
        json.dumps({"text": "Eagles nest on cliffs."}),
    ]
    (docs / "r.jsonl").write_bytes(
        "\n".join(lines).encode() + b"\n" + b'{"text": "caf\xe9 au lait"}\n'
    )
    (docs / "w.jsonl").write_bytes(
        (json.dumps({"text": "Wide lines about wolves."}) + "\n").encode("utf-16")
    )
    result = run_kb("ingest", *KB, str(docs), cwd=kb_config)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    for number in range(2, 9):
        assert f"r.jsonl:{number}:" in result.stderr, number
    assert "r.jsonl:10: not UTF-8" in result.stderr
    assert result.stdout.startswith("2 files ingested (0 unchanged), 3 chunks")
    found = run_kb("search", *KB, "wolves", cwd=kb_config)
    assert "Wide lines about wolves" in found.stdout
    (docs / "s.jsonl").write_bytes((docs / "r.jsonl").read_bytes() + b"\n")
    before = kb_state(kb_config)
    strict = run_kb("ingest", *KB, "--strict", str(docs / "s.jsonl"), cwd=kb_config)
    assert strict.returncode == 1 and "s.jsonl:2: not JSON" in strict.stderr
    assert kb_state(kb_config) == before


def test_kb_search_escapes_control_characters(kb_config):
    docs = kb_config / "docs"
    docs.mkdir()
    (docs / "evil.txt").write_text(
        "Refund policy \x1b]0;owned\x07 \x1b[2J\x1b[31m red \u202e reversed \x9b1m"
    )
    run_kb("ingest", *KB, str(docs), cwd=kb_config)
    for extra in ((), ("--full",)):
        found = run_kb("search", *KB, "refund policy", *extra, cwd=kb_config)
        assert found.returncode == 0, found.stderr
        assert "Refund policy" in found.stdout
        for raw in ("\x1b", "\x07", "\u202e", "\x9b"):
            assert raw not in found.stdout, (extra, raw)
        assert "\\x1b]0;owned\\x07" in found.stdout
