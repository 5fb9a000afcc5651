"""Files into a knowledge base: .txt, .md, .html, .pdf and .jsonl, read into chunks.

A file whose content hash is already in the base is skipped; a changed one has its chunks
replaced. A whole command runs in one transaction: a file that cannot be read (naming the
file, and the line of a .jsonl) leaves the base as it was.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from llmgate.kb.chunking import Chunk, Section, chunk_sections, markdown_sections
from llmgate.kb.embeddings import Embedder, EmbeddingError
from llmgate.kb.store import Store

_SPACES = re.compile(r"\s+")
PREFETCH = 2  # files read and chunked ahead of the one being indexed
FORMATS = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".jsonl")


class IngestError(Exception):
    """A file that cannot go into the base; the message names it."""


@dataclass
class Summary:
    files: int = 0  # ingested (new or changed)
    unchanged: int = 0
    chunks: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"{self.files} files ingested ({self.unchanged} unchanged), {self.chunks} chunks, "
            f"{self.bytes / 2**20:.2f} MB in {self.seconds:.2f} s"
        )


def files_under(paths: Iterable[str]) -> list[Path]:
    """The files named, and those under the folders named, that have a known format."""
    out: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and _known(p))
        elif path.is_file():
            if not _known(path):
                known = ", ".join(FORMATS)
                raise IngestError(f"{path}: unknown format {path.suffix or '(none)'} ({known})")
            out.append(path)
        else:
            raise IngestError(f"{path}: no such file or folder")
    return out


def ingest(
    store: Store,
    files: list[Path],
    chunk_tokens: int,
    overlap_tokens: int,
    text_field: str = "text",
    progress: Callable[[Iterable[Path]], Iterable[Path]] = lambda files: files,
    embedder: Embedder | None = None,
) -> Summary:
    summary = Summary()
    started = time.monotonic()
    with store.transaction():
        _ingest_files(store, files, chunk_tokens, overlap_tokens, text_field, progress, summary)
        if embedder is not None:
            _embed(store, embedder)
    summary.seconds = time.monotonic() - started
    return summary


def _embed(store: Store, embedder: Embedder) -> None:
    """Vectors for every chunk still without one (new ones, and a base made without)."""
    missing = store.without_vectors()
    for start in range(0, len(missing), 512):
        part = missing[start : start + 512]
        try:
            matrix = embedder.embed_sync([text for _, text in part])
        except EmbeddingError as exc:
            raise IngestError(f"embeddings: {exc}") from None
        store.set_vectors(
            [(row.tobytes(), chunk) for row, (chunk, _) in zip(matrix, part, strict=True)]
        )


@dataclass
class _Prepared:
    raw: bytes
    digest: str
    chunks: list[Chunk] | None  # None: unchanged


def _ingest_files(
    store: Store,
    files: list[Path],
    chunk_tokens: int,
    overlap_tokens: int,
    text_field: str,
    progress: Callable[[Iterable[Path]], Iterable[Path]],
    summary: Summary,
) -> None:
    # The settings that shape the chunks are part of what "unchanged" means.
    shape = f"|{chunk_tokens}|{overlap_tokens}|{text_field}".encode()
    known = store.hashes()

    def prepare(path: Path) -> _Prepared:
        raw = _read_bytes(path)
        digest = hashlib.sha256(raw + shape).hexdigest()
        if known.get(str(path.resolve())) == digest:
            return _Prepared(raw, digest, None)
        return _Prepared(raw, digest, _chunks(path, raw, chunk_tokens, overlap_tokens, text_field))

    # The next files are read and chunked on a thread while SQLite indexes this one (it
    # lets go of the GIL while it works): most of an ingest is FTS5's indexing.
    with ThreadPoolExecutor(1, thread_name_prefix="kb-ingest") as pool:
        ahead: deque[Future[_Prepared]] = deque()
        queued = iter(files)
        try:
            for path in progress(files):
                while len(ahead) < PREFETCH and (nxt := next(queued, None)) is not None:
                    ahead.append(pool.submit(prepare, nxt))
                item = ahead.popleft().result()
                if item.chunks is None:
                    summary.unchanged += 1
                    continue
                store.replace(str(path.resolve()), item.digest, len(item.raw), item.chunks)
                summary.files += 1
                summary.chunks += len(item.chunks)
                summary.bytes += len(item.raw)
        finally:
            for future in ahead:
                future.cancel()


def _known(path: Path) -> bool:
    return path.suffix.lower() in FORMATS


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise IngestError(f"{path}: cannot read ({exc.strerror})") from None


def _chunks(path: Path, raw: bytes, size: int, overlap: int, text_field: str) -> list[Chunk]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return list(_jsonl_chunks(path, raw, size, overlap, text_field))
    if suffix == ".pdf":
        sections = _pdf_sections(path, raw)
    else:
        text = _text(path, raw)
        sections = markdown_sections(_html_text(text) if suffix in (".html", ".htm") else text)
    return chunk_sections(sections, size, overlap)


def _text(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise IngestError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def _jsonl_chunks(
    path: Path, raw: bytes, size: int, overlap: int, text_field: str
) -> Iterator[Chunk]:
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and U+0085 unescaped
    for number, line in enumerate(_text(path, raw).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise IngestError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise IngestError(f"{path}:{number}: no string field '{text_field}' (--text-field)")
        meta: dict[str, Any] = {k: v for k, v in record.items() if k != text_field}
        meta["line"] = number
        heading = str(record.get("title") or record.get("heading") or "")
        for chunk in chunk_sections([Section(heading, record[text_field])], size, overlap):
            yield Chunk(chunk.heading, chunk.text, meta)


def _pdf_sections(path: Path, raw: bytes) -> list[Section]:
    import io

    try:
        from pypdf import PdfReader
        from pypdf.errors import PyPdfError
    except ImportError:  # pragma: no cover - a declared dependency
        raise IngestError(f"{path}: reading PDF needs the pypdf package") from None
    try:
        reader = PdfReader(io.BytesIO(raw))
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:
        raise IngestError(f"{path}: not a readable PDF ({type(exc).__name__})") from None
    return [Section(f"page {i}", text) for i, text in enumerate(pages, 1) if text.strip()]


class _HtmlText(HTMLParser):
    """An HTML page's text as markdown-ish lines: headings as `#`, blocks as paragraphs."""

    _BLOCKS = frozenset(
        ("p", "div", "li", "br", "tr", "section", "article", "table", "ul", "ol", "pre", "dd",
         "blockquote")
    )
    _SKIP = frozenset(("script", "style", "noscript", "template", "head"))

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self._SKIP:
            self._skip += 1
        elif len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self._BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skip = max(0, self._skip - 1)
        elif (len(tag) == 2 and tag[0] == "h" and tag[1] in "123456") or tag in self._BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(_SPACES.sub(" ", data))


def _html_text(html: str) -> str:
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    lines = [line.strip() for line in "".join(parser.parts).split("\n")]
    return "\n".join(lines)
