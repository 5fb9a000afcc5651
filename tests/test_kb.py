"""The knowledge base: chunking, ingest of every format, the kb commands, retrieval quality."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmgate.kb.chunking import Section, chunk_sections, markdown_sections
from llmgate.kb.ingest import files_under, ingest
from llmgate.kb.store import Store, match_query
from llmgate.stages.rag import query_text

DATA = Path(__file__).parent / "data"


def test_sections_follow_headings_and_not_code():
    text = "intro\n# A\none\n## B\ntwo\n```\n# not a heading\n```\n# C\nthree"
    sections = markdown_sections(text)
    assert [(s.heading, s.text.split("\n")[0]) for s in sections] == [
        ("", "intro"),
        ("A", "one"),
        ("A > B", "two"),
        ("C", "three"),
    ]
    assert "# not a heading" in sections[2].text


def test_chunks_pack_paragraphs_and_overlap():
    paragraphs = [" ".join(f"p{i}w{j}" for j in range(30)) for i in range(5)]
    [*chunks] = chunk_sections([Section("H", "\n\n".join(paragraphs))], 70, 10)
    assert all(len(c.text.split()) <= 70 for c in chunks)
    assert chunks[0].text.split()[:30] == paragraphs[0].split()
    # each chunk after the first starts with the last words of the one before
    for before, after in itertools.pairwise(chunks):
        assert after.text.split()[:10] == before.text.split()[-10:]
    assert {c.heading for c in chunks} == {"H"}
    words = " ".join(paragraphs).split()
    assert set(words) <= {w for c in chunks for w in c.text.split()}


def test_a_paragraph_longer_than_a_chunk_is_cut_into_windows():
    long = " ".join(f"w{i}" for i in range(250))
    chunks = chunk_sections([Section("", long)], 100, 20)
    assert [len(c.text.split()) for c in chunks] == [100, 100, 90]
    assert chunks[1].text.split()[0] == "w80"


def test_match_query_keeps_the_words_that_matter():
    assert match_query("What are your opening hours?") == '"opening" OR "hours"'
    assert match_query("who are you") is None  # filler only: nothing to look for
    assert match_query("?!") is None
    assert match_query('say "hi" NEAR NOT') == '"say" OR "hi" OR "NEAR" OR "NOT"'
    assert match_query("İstanbul") == '"İstanbul"'  # FTS5 folds case, not str.lower
    assert match_query(" ".join(f"w{i}" for i in range(1000))).count(" OR ") == 63


def test_headings_keep_a_trailing_hash_and_fences_close_on_their_own_kind():
    text = "# C#\nabout C#\n  ## Indented ##\nbody\n~~~\n```\n# inside\n~~~\n# After\nend"
    sections = markdown_sections(text)
    assert [s.heading for s in sections] == ["C#", "C# > Indented", "After"]
    assert "# inside" in sections[1].text


def test_html_keeps_the_spaces_between_inline_elements(tmp_path):
    page = tmp_path / "p.html"
    page.write_text("<p>Refunds take <b>14</b> days, <i>not</i>weeks.</p>")
    store = Store(tmp_path / "kb.sqlite")
    ingest(store, [page], 200, 30)
    assert store.search("refunds", 1)[0].text == "Refunds take 14 days, notweeks."


def test_jsonl_strings_may_hold_line_separators(tmp_path):
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps({"text": "one\u2028two\u0085three"}, ensure_ascii=False) + "\n")
    store = Store(tmp_path / "kb.sqlite")
    assert ingest(store, [records], 200, 30).chunks == 1


def test_new_chunk_settings_make_a_file_changed(tmp_path, docs):
    store = Store(tmp_path / "kb.sqlite")
    ingest(store, files_under([str(docs)]).files, 200, 30)
    again = ingest(store, files_under([str(docs)]).files, 100, 10)
    assert (again.files, again.unchanged) == (5, 0)


def make_pdf(text: str) -> bytes:
    """A one-page PDF with `text` in Helvetica, offsets computed."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return out


@pytest.fixture
def docs(tmp_path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("Plain text about the aquarium schedule.\n\nFeeding at noon.")
    (folder / "b.md").write_text("# Boats\n\nThe ferry leaves at dawn.\n")
    (folder / "c.html").write_text(
        "<html><head><title>x</title><style>p{}</style></head><body><h1>Castle</h1>"
        "<p>The castle opens its gates at nine.</p><script>var hidden = 1;</script></body>"
    )
    (folder / "d.pdf").write_bytes(make_pdf("The dungeon tour lasts forty minutes"))
    (folder / "e.jsonl").write_text(
        json.dumps({"text": "Elephants bathe in the river.", "title": "Zoo", "id": 7}) + "\n"
        + json.dumps({"text": "Eagles nest on cliffs.", "id": 8}) + "\n"
    )
    (folder / "skip.bin").write_bytes(b"\x00\x01")
    return folder


def test_every_format_goes_in_and_is_found(tmp_path, docs):
    store = Store(tmp_path / "kb.sqlite")
    summary = ingest(store, files_under([str(docs)]).files, 200, 30)
    assert (summary.files, summary.chunks) == (5, 6)
    assert len(store.sources()) == 5
    for question, source, heading in [
        ("aquarium feeding", "a.txt", ""),
        ("when does the ferry leave", "b.md", "Boats"),
        ("castle gates", "c.html", "Castle"),
        ("how long is the dungeon tour", "d.pdf", "page 1"),
        ("elephants river", "e.jsonl", "Zoo"),
    ]:
        [hit, *_] = store.search(question, 3)
        assert Path(hit.source).name == source and hit.heading == heading, question
    [eagle] = store.search("eagles", 1)
    assert eagle.meta == {"id": 8, "line": 2}
    assert not store.search("hidden", 3)  # scripts are not text


def test_re_ingest_skips_unchanged_and_replaces_changed(tmp_path, docs):
    store = Store(tmp_path / "kb.sqlite")
    ingest(store, files_under([str(docs)]).files, 200, 30)
    again = ingest(store, files_under([str(docs)]).files, 200, 30)
    assert (again.files, again.unchanged) == (0, 5)
    (docs / "b.md").write_text("# Boats\n\nThe ferry now leaves at midnight.\n")
    changed = ingest(store, files_under([str(docs)]).files, 200, 30)
    assert (changed.files, changed.unchanged) == (1, 4)
    assert not store.search("dawn", 3)
    assert "midnight" in store.search("ferry", 1)[0].text
    assert store.stats()["chunks"] == 6
    integrity(store)


def integrity(store: Store) -> None:
    """FTS5's own check: its index holds exactly the chunks' text, each row once."""
    store.conn.execute("INSERT INTO chunks_fts(chunks_fts, rank) VALUES ('integrity-check', 1)")


def test_a_base_indexed_by_a_trigger_is_not_indexed_twice(tmp_path, docs):
    path = tmp_path / "kb.sqlite"
    Store(path).conn.execute(  # what bases made before had: a row indexed as it went in
        "CREATE TRIGGER chunks_ai AFTER INSERT ON chunks BEGIN INSERT INTO chunks_fts"
        "(rowid, text, heading) VALUES (new.id, new.text, new.heading); END"
    )
    store = Store(path)
    ingest(store, files_under([str(docs)]).files, 200, 30)
    integrity(store)
    assert len(store.search("ferry", 5)) == 1


def run_kb(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmgate", "kb", *args],
        capture_output=True, text=True, cwd=cwd, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )


def kb_state(folder: Path) -> tuple:
    store = Store(folder / "kb" / "docs.sqlite")
    try:
        return tuple(store.sources()), store.stats()["chunks"]
    finally:
        store.close()


def test_the_kb_commands(kb_config, docs):
    result = run_kb("ingest", "--config", "c.toml", "--kb", "docs", str(docs), cwd=kb_config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("5 files ingested (0 unchanged), 6 chunks")
    assert "\r" not in result.stderr  # no progress bar when not on a terminal
    found = run_kb("search", "--config", "c.toml", "--kb", "docs", "castle gates", "--k", "1",
                   cwd=kb_config)
    assert "c.html > Castle" in found.stdout and "nine" in found.stdout
    stats = run_kb("stats", "--config", "c.toml", "--kb", "docs", cwd=kb_config)
    assert stats.stdout.startswith("5 files, 6 chunks")
    listed = run_kb("list", "--config", "c.toml", "--kb", "docs", cwd=kb_config).stdout
    assert len(listed.splitlines()) == 5 and "d.pdf" in listed
    gone = run_kb("remove", "--config", "c.toml", "--kb", "docs", str(docs / "a.txt"),
                  cwd=kb_config)
    assert gone.returncode == 0 and kb_state(kb_config)[1] == 5


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.txt", "missing.txt: no such file or folder"),
        (lambda d: d / "skip.bin", "skip.bin: unsupported format .bin"),
        (lambda d: (d / "bad.pdf").write_bytes(b"%PDF-1.4 garbage") and d / "bad.pdf",
         "bad.pdf: not a readable PDF"),
        (lambda d: (d / "bad.jsonl").write_text('{"text": "ok"}\n{nope\n') and d / "bad.jsonl",
         "bad.jsonl:2: not JSON"),
        (lambda d: (d / "f.jsonl").write_text('{"body": "x"}\n') and d / "f.jsonl",
         "f.jsonl:1: no string field 'text'"),
    ],
)
def test_bad_input_names_the_file_and_changes_nothing(kb_config, docs, make, message):
    """With --strict (a missing file always): the whole command is undone. Without, what
    cannot be read is named and skipped, and the rest goes in."""
    run_kb("ingest", "--config", "c.toml", "--kb", "docs", str(docs / "a.txt"), cwd=kb_config)
    before = kb_state(kb_config)
    bad = make(docs)
    # the good file named first would have gone in: the whole command is undone
    result = run_kb("ingest", "--config", "c.toml", "--kb", "docs", "--strict",
                    str(docs / "b.md"), str(bad), cwd=kb_config)
    assert result.returncode == 1
    assert message in result.stderr and "unchanged" in result.stderr
    assert "Traceback" not in result.stderr
    assert kb_state(kb_config) == before
    lenient = run_kb("ingest", "--config", "c.toml", "--kb", "docs", str(docs / "b.md"),
                     str(bad), cwd=kb_config)
    assert message in lenient.stderr and "Traceback" not in lenient.stderr
    if "no such file" in message:
        assert lenient.returncode == 1 and kb_state(kb_config) == before
    else:
        assert lenient.returncode == 0
        assert any(path.endswith("b.md") for path, *_ in kb_state(kb_config)[0])


def test_an_unknown_kb_is_refused(kb_config):
    result = run_kb("stats", "--config", "c.toml", "--kb", "nope", cwd=kb_config)
    assert result.returncode == 2 and "no [kb.nope]" in result.stderr


def test_removing_what_is_not_there_changes_nothing(kb_config, docs):
    run_kb("ingest", "--config", "c.toml", "--kb", "docs", str(docs), cwd=kb_config)
    before = kb_state(kb_config)
    result = run_kb("remove", "--config", "c.toml", "--kb", "docs", str(docs / "a.txt"),
                    str(docs / "zzz.txt"), cwd=kb_config)
    assert result.returncode == 1 and "zzz.txt" in result.stderr
    assert kb_state(kb_config) == before


# (conversation so far as user turns, the heading that holds the answer)
QUESTIONS = [
    (["What time do you open on Saturday?"], "Opening hours"),
    (["Are you open on Christmas Day?"], "Opening hours"),
    (["Where is your main store?"], "Locations"),
    (["Is there a shop in Cabot Circus?"], "Locations"),
    (["Where can I park my car?"], "Parking"),
    (["How long does standard delivery take?"], "Delivery"),
    (["Do you ship abroad?"], "Delivery"),
    (["Can I get it tomorrow with express delivery?"], "Delivery"),
    (["How many days do I have to return something?"], "Returns"),
    (["When will my refund arrive?"], "Refunds"),
    (["Do you take American Express?"], "Payment"),
    (["Can I pay by cheque?"], "Payment"),
    (["How long is the warranty on a fridge or other electrical appliances?"], "Warranty"),
    (["Does the guarantee cover accidental damage?"], "Warranty"),
    (["How long is a gift card valid?"], "Gift cards"),
    (["How do points work in the Lumen Club?"], "Loyalty programme"),
    (["Can I bring my dog?"], "Pets"),
    (["How do I call customer service?"], "Contact"),  # BM25 needs a shared word
    (["Can someone assemble my wardrobe at home?"], "Assembly service"),
    (["Will you match a cheaper price from another shop?"], "Price match"),
    # follow-ups: only the turn before says what they are about
    (["How much does express delivery cost?", "And the standard one?"], "Delivery"),
    (["Tell me about your warranty.", "What about furniture?"], "Warranty"),
    (["When are you open during the week?", "And on weekends?"], "Opening hours"),
    (["Do you have a loyalty programme?", "Is it free to join?"], "Loyalty programme"),
]


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Store:
    store = Store(tmp_path_factory.mktemp("kb") / "shop.sqlite")
    ingest(store, [DATA / "shop.md"], 60, 10)
    return store


@pytest.mark.parametrize(("turns", "heading"), QUESTIONS)
def test_the_right_passage_is_in_the_top_three(shop, turns, heading):
    messages = [{"role": "user", "content": t} for t in turns]
    hits = shop.search(query_text(messages, 2), 3)
    assert heading in [h.heading.split(" > ")[-1] for h in hits]


def test_a_retrieval_service_has_nothing_to_build(tmp_path):
    (tmp_path / "c.toml").write_text(
        '[providers.a]\nbase_url = "http://127.0.0.1:9/v1"\n'
        '[kb.svc]\nkind = "http"\nurl = "http://127.0.0.1:9/search"\n'
    )
    result = run_kb("stats", "--config", "c.toml", "--kb", "svc", cwd=tmp_path)
    assert result.returncode == 2 and "retrieval service" in result.stderr
