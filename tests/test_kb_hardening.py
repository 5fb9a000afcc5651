"""A real folder into a knowledge base: charsets, files of no known kind, what a passage
says of its source, duplicates, the passage budget, and the commands' output."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from llmgate.kb.ingest import files_under, ingest
from llmgate.kb.store import Store
from tests.test_kb import kb_state, run_kb

ROOT = Path(__file__).parent.parent
KB = ("--config", "c.toml", "--kb", "docs")


@pytest.fixture
def real_folder(kb_config) -> Path:
    docs = kb_config / "srv" / "kb" / "docs"
    (docs / "legal").mkdir(parents=True)
    (docs / "latin.html").write_bytes(
        b'<html><head><meta http-equiv="Content-Type" content="text/html; '
        b'charset=ISO-8859-1"></head><body><h1>Caf\xe9</h1><p>Cr\xe8me br\xfbl\xe9e '
        b"is served after nine.</p></body></html>"
    )
    (docs / "page.xhtml").write_bytes(
        b'<?xml version="1.0" encoding="windows-1252"?><html><body>'
        b"<p>The museum \x93shop\x94 sells postcards.</p></body></html>"
    )
    (docs / "legal" / "LICENSE").write_text("Permission to copy the lighthouse manual.\n")
    (docs / "legal" / "GPL-3.txt").write_text("Copyleft terms of the general public license.")
    (docs / "archive.gz").write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(64))
    (docs / "program").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(64))
    (docs / "old.txt").write_bytes(b"Windows-1252 \x93quotes\x94 not declared")
    return docs


def test_a_real_folder_goes_in_and_what_cannot_is_counted(kb_config, real_folder):
    result = run_kb("ingest", *KB, str(real_folder), cwd=kb_config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("4 files ingested (0 unchanged)"), result.stdout
    assert "3 files skipped (1 binary, 1 encoding, 1 unsupported)" in result.stdout
    assert "archive.gz: unsupported format .gz" in result.stderr
    assert "program: binary" in result.stderr
    assert "old.txt: not UTF-8 text (byte 13)" in result.stderr
    store = Store(kb_config / "kb" / "docs.sqlite")
    try:
        [cafe] = store.search("creme brulee", 1)  # FTS5 folds the accents
        assert cafe.heading == "Café" and "Crème brûlée" in cafe.text
        assert "“shop”" in store.search("museum postcards", 1)[0].text
        assert store.search("lighthouse manual", 1)[0].source == "legal/LICENSE"
    finally:
        store.close()
    strict = run_kb("ingest", *KB, "--strict", str(real_folder), cwd=kb_config)
    assert strict.returncode == 1 and "archive.gz" in strict.stderr


def test_a_declared_charset_that_lies_is_skipped_not_fatal(tmp_path):
    page = tmp_path / "lie.html"
    page.write_bytes(b'<meta charset="utf-8"><p>caf\xe9</p>')
    ok = tmp_path / "ok.md"
    ok.write_text("Ferries leave at dawn.")
    warnings: list[str] = []
    store = Store(tmp_path / "kb.sqlite")
    summary = ingest(store, [page, ok], 200, 30, warn=warnings.append)
    assert summary.files == 1 and summary.skipped == {"encoding": 1}
    assert warnings == [f"{page}: not utf-8 text as declared (byte 28), skipped"]


def test_progress_counts_bytes(tmp_path, real_folder):
    scan = files_under([str(real_folder)])
    done: list[int] = []
    ingest(Store(tmp_path / "kb.sqlite"), scan.files, 200, 30, progress=done.append)
    assert sum(done) == sum(f.size for f in scan.files) == sum(
        p.stat().st_size for p in real_folder.rglob("*")
        if p.is_file() and p.name not in ("archive.gz",)
    )


def test_the_progress_bar_on_a_terminal_is_in_bytes(kb_config, real_folder):
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmgate", "kb", "ingest", *KB, str(real_folder)],
        cwd=kb_config, stdout=subprocess.PIPE, stderr=child, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    os.close(child)
    proc.wait(timeout=60)
    shown = b""
    while select.select([main], [], [], 0.2)[0]:
        try:
            piece = os.read(main, 65536)
        except OSError:
            break
        if not piece:
            break
        shown += piece
    os.close(main)
    assert proc.returncode == 0
    text = shown.decode(errors="replace")
    bars = [piece for piece in text.split("\r") if "%|" in piece]
    assert bars and "B/s" in bars[-1] and "it/s" not in text, text
    assert "program: binary" in text  # a warning does not break the bar


# 7. what a passage carries upstream


async def test_passages_name_their_file_relative_to_the_folder_and_are_distinct(
    make_gateway, connect, upstream, kb_config
):
    docs = kb_config / "srv" / "kb" / "docs"
    (docs / "legal").mkdir(parents=True)
    (docs / "legal" / "GPL-3.txt").write_text("The general public license lets you copy it.")
    page = ("Refunds are paid within fourteen days to the card used, and store credit is "
            "offered for gifts returned without a receipt. ") * 3
    (docs / "refunds.md").write_text(f"# Refunds\n\n**Refunds** policy. {page}\n")
    (docs / "refunds.html").write_text(f"<h1>Refunds</h1><p>Refunds policy. {page}</p>")
    (docs / "other.md").write_text("Refunds for broken items are paid at once, receipt or not.")
    result = run_kb("ingest", *KB, str(docs), cwd=kb_config)
    assert result.returncode == 0, result.stderr
    gateway = await make_gateway(
        kb={"docs": {"path": str(kb_config / "kb" / "docs.sqlite")}},
        rag={"docs": {"kb": "docs", "top_k": 2, "waiting": {"phrases": []}}},
        routes=[{"path": "/rag/chat/completions", "rag": "docs"}],
    )
    client = connect(gateway).with_options(base_url=str(gateway.make_url("/rag")))
    for question in ("How are refunds paid without a receipt?", "public license copy"):
        await client.chat.completions.create(
            model="text", messages=[{"role": "user", "content": question}]
        )
    refunds, license_ = (r["messages"][0]["content"] for r in upstream.requests)
    assert str(kb_config) not in refunds + license_
    assert "(legal/GPL-3.txt)" in license_
    # the page as .md and as .html is one passage: the other slot goes to another file
    assert "(other.md)" in refunds
    assert ("(refunds.md - Refunds)" in refunds) != ("(refunds.html - Refunds)" in refunds)


async def test_a_small_context_is_not_overflowed(make_gateway, connect, upstream, kb_config):
    docs = kb_config / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"f{i}.txt").write_text(f"Harbour fees number {i}. " + "harbour tide " * 95)
    run_kb("ingest", *KB, str(docs), cwd=kb_config)
    gateway = await make_gateway(
        kb={"docs": {"path": str(kb_config / "kb" / "docs.sqlite")}},
        rag={"docs": {"kb": "docs", "top_k": 6, "max_context_tokens": 300,
                      "waiting": {"phrases": []}}},
        routes=[{"path": "/rag/chat/completions", "rag": "docs"}],
    )
    client = connect(gateway).with_options(base_url=str(gateway.make_url("/rag")))
    await client.chat.completions.create(
        model="text", messages=[{"role": "user", "content": "harbour fees"}]
    )
    system = upstream.requests[0]["messages"][0]["content"]
    passages = system[system.index("[1]") :]
    assert len(passages) <= 300 * 4 + 4  # and " ..." where the last one was cut
    assert passages.endswith(" ...") and "[2]" in passages


# 8. the commands' output


def test_kb_list_into_head_ends_quietly(kb_config):
    docs = kb_config / "docs"
    docs.mkdir()
    for i in range(3000):
        (docs / f"note{i:04}.txt").write_text(f"note {i}")
    assert run_kb("ingest", *KB, str(docs), cwd=kb_config).returncode == 0
    shell = subprocess.run(
        f"{sys.executable} -m llmgate kb list {' '.join(KB)} | head -1",
        shell=True, capture_output=True, text=True, cwd=kb_config, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert shell.stdout.count("\n") == 1 and "note0000.txt" in shell.stdout
    assert shell.stderr == ""


def test_kb_search_full_and_json(kb_config):
    docs = kb_config / "docs"
    docs.mkdir()
    long = "The lighthouse keeper logs the weather " + "and the ships passing by " * 15 + "END"
    (docs / "log.txt").write_text(long + "\n\nSecond paragraph.")
    run_kb("ingest", *KB, str(docs), cwd=kb_config)
    short = run_kb("search", *KB, "lighthouse keeper", cwd=kb_config).stdout
    assert "..." in short and "END" not in short
    full = run_kb("search", *KB, "lighthouse keeper", "--full", cwd=kb_config).stdout
    assert "END" in full and "Second paragraph." in full
    lines = run_kb("search", *KB, "lighthouse keeper", "--json", cwd=kb_config).stdout
    [hit] = [json.loads(line) for line in lines.splitlines()]
    assert hit["source"] == "log.txt" and hit["text"].startswith(long) and hit["score"] > 0
    assert kb_state(kb_config)[1] == 1


async def test_the_kb_commands_run_on_a_thread(kb_config, monkeypatch):
    """Signals are the main thread's: run elsewhere, the commands leave SIGINT alone."""
    import asyncio

    from llmgate.kb import cli as kb_cli

    monkeypatch.chdir(kb_config)
    assert await asyncio.to_thread(kb_cli.main, ["stats", *KB]) == 0
