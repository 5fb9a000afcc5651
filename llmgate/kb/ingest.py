"""Files into a knowledge base: .txt, .md, .html, .pdf, .jsonl and text without an extension.

    files_under(paths)  ->  Scan: the files to read (each with the name passages carry:
                            its path relative to the folder named), and those skipped
    ingest(store, files) -> Summary: what went in, what was skipped and why

What a folder holds is not trusted: a symlink (to /proc/self/environ, to a secret) or
anything resolving outside the folder named is skipped and named, unless
`follow_symlinks` (and even then nothing in /proc, /sys or /dev); a file larger than
`max_bytes` is skipped; a file is opened without following a link and must still be the
one scanned. A file that cannot be read (its encoding, a broken PDF, a binary) and a .jsonl
line that is not a record with a string text are skipped with a warning naming them; with
`strict` the first one fails the command instead. `data:` URIs (an image inlined as base64)
are dropped from the text.

A file whose content hash is already in the base is skipped; a changed one has its chunks
replaced. The writer (llmgate.kb.base.Writer) keeps every source whole or absent: on SQLite
a whole command is one transaction, so an error or Ctrl-C (the `stop` event, which also
ends the statement running) leaves the base as it was; on PostgreSQL each source is one.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from llmgate.kb.base import Writer
from llmgate.kb.chunking import Chunk, Section, Stopped, chunk_sections, iter_sections
from llmgate.kb.embeddings import Embedder, EmbeddingError

log = logging.getLogger("llmgate.kb")

_SPACES = re.compile(r"\s+")
PREFETCH = 2  # files read and chunked ahead of the one being indexed
FORMATS = (".txt", ".md", ".markdown", ".html", ".htm", ".xhtml", ".pdf", ".jsonl")
_HTML = (".html", ".htm", ".xhtml")
MAX_FILE_MB = 50.0  # the default cap on one file (`--max-file-mb`)
FORBIDDEN = (Path("/proc"), Path("/sys"), Path("/dev"))
HEADING_CHARS = 200  # a .jsonl title longer than this is cut
_SHAPE_VERSION = "2"  # chunks bounded in characters, data: URIs dropped
_DATA_URI = re.compile(
    r"data:[\w.+-]+/[\w.+-]+(?:;[\w.+-]+(?:=[\w.+-]*)?)*,[^\s)\"'<>\]]*", re.IGNORECASE
)
_META_CHARSET = re.compile(rb"""<meta\b[^>]*?charset\s*=\s*["']?\s*([\w.:-]+)""", re.IGNORECASE)
_XML_ENCODING = re.compile(rb"""^\s*<\?xml\b[^>]*?encoding\s*=\s*["']([\w.:-]+)["']""")
_BOMS = (  # UTF-32's before UTF-16's: they begin alike
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


class IngestError(Exception):
    """A command that cannot go on; the message names the file."""


class Skip(Exception):
    """A file left out: `reason` is what the summary counts, the message says more."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Source:
    path: Path  # as found: what is opened
    key: str  # the resolved path: the source's identity in the base (`kb remove`)
    name: str  # relative to the folder named, or the file's name: what a passage carries
    size: int
    ident: tuple[int, int]  # (st_dev, st_ino) of what was scanned: what must be read


@dataclass
class Scan:
    files: list[Source] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (reason, message)


@dataclass
class Summary:
    files: int = 0  # ingested (new or changed)
    unchanged: int = 0
    chunks: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: Counter[str] = field(default_factory=Counter)  # files left out, by reason
    lines_skipped: int = 0  # .jsonl lines left out

    def line(self) -> str:
        out = (
            f"{self.files} files ingested ({self.unchanged} unchanged), {self.chunks} chunks, "
            f"{self.bytes / 2**20:.2f} MB in {self.seconds:.2f} s"
        )
        if self.skipped:
            reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
            out += f"; {self.skipped.total()} files skipped ({reasons})"
        if self.lines_skipped:
            out += f"; {self.lines_skipped} .jsonl lines skipped"
        return out


def _forbidden(real: Path) -> Path | None:
    return next((f for f in FORBIDDEN if real == f or real.is_relative_to(f)), None)


def files_under(
    paths: Iterable[str],
    follow_symlinks: bool = False,
    max_bytes: int = int(MAX_FILE_MB * 2**20),
) -> Scan:
    """The files named, and those under the folders named, that can go in; the others
    with the reason. A path that does not exist is an IngestError (a typo)."""
    scan = Scan()
    for name in paths:
        path = Path(name)
        if not path.is_symlink() and not path.exists():
            raise IngestError(f"{path}: no such file or folder")
        if path.is_symlink() and not follow_symlinks:
            scan.skipped.append(_symlink(path))
            continue
        if path.is_dir():
            _walk(path, follow_symlinks, max_bytes, scan)
        else:
            _consider(path, path.name, None, follow_symlinks, max_bytes, scan)
    return scan


def _symlink(path: Path) -> tuple[str, str]:
    return "symlink", f"{path}: symlink, skipped (--follow-symlinks to follow it)"


def _walk(root: Path, follow: bool, max_bytes: int, scan: Scan) -> None:
    root_real = root.resolve()
    if (into := _forbidden(root_real)) is not None:
        scan.skipped.append(("special", f"{root}: resolves into {into}, skipped"))
        return
    seen: set[tuple[int, int]] = set()
    found: list[tuple[Path, str]] = []
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in seen:  # a loop of links
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(folder))
        except OSError as exc:
            scan.skipped.append(("unreadable", f"{folder}: cannot read ({exc.strerror})"))
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                scan.skipped.append(("hidden", f"{path}: hidden, skipped"))
                continue
            if entry.is_symlink() and not follow:
                scan.skipped.append(_symlink(path))
                continue
            if entry.is_dir():  # follows a link (only when following them)
                real = path.resolve()
                if (into := _forbidden(real)) is not None:
                    scan.skipped.append(("special", f"{path}: resolves into {into}, skipped"))
                elif not follow and not real.is_relative_to(root_real):
                    scan.skipped.append(("outside", f"{path}: outside {root}, skipped"))
                else:
                    folders.append(path)
            else:
                found.append((path, path.relative_to(root).as_posix()))
    for path, name in sorted(found):
        _consider(path, name, root_real, follow, max_bytes, scan)


def _consider(
    path: Path, name: str, root: Path | None, follow: bool, max_bytes: int, scan: Scan
) -> None:
    """A file found (under `root`, when a folder was named): in the scan, or skipped."""
    try:
        real = path.resolve(strict=True)
        st = path.stat()
    except (OSError, RuntimeError) as exc:
        why = getattr(exc, "strerror", None) or "a loop of links"
        scan.skipped.append(("unreadable", f"{path}: cannot read ({why})"))
        return
    if (into := _forbidden(real)) is not None:
        scan.skipped.append(("special", f"{path}: resolves into {into}, skipped"))
    elif root is not None and not follow and not real.is_relative_to(root):
        scan.skipped.append(("outside", f"{path}: outside {root}, skipped"))
    elif not stat.S_ISREG(st.st_mode):
        scan.skipped.append(("not a file", f"{path}: not a regular file, skipped"))
    elif path.suffix and path.suffix.lower() not in FORMATS:
        scan.skipped.append(
            ("unsupported", f"{path}: unsupported format {path.suffix}, skipped "
                            f"({', '.join(FORMATS)} or text without an extension)")
        )
    elif st.st_size > max_bytes:
        scan.skipped.append(_too_large(path, st.st_size, max_bytes))
    else:
        scan.files.append(Source(path, str(real), name, st.st_size, (st.st_dev, st.st_ino)))


def _too_large(path: Path, size: int, max_bytes: int) -> tuple[str, str]:
    return "too large", (
        f"{path}: too large ({size / 2**20:.1f} MB, over {max_bytes / 2**20:g} MB), skipped "
        "(--max-file-mb to raise it)"
    )


def _source(path: Path) -> Source:
    st = path.stat()
    return Source(path, str(path.resolve()), path.name, st.st_size, (st.st_dev, st.st_ino))


def ingest(
    store: Writer,
    files: Iterable[Path | Source],
    chunk_tokens: int,
    overlap_tokens: int,
    text_field: str = "text",
    progress: Callable[[int], object] | None = None,
    embedder: Embedder | None = None,
    *,
    warn: Callable[[str], object] = log.warning,
    stop: threading.Event | None = None,
    strict: bool = False,
    follow_symlinks: bool = False,
    max_bytes: int = int(MAX_FILE_MB * 2**20),
) -> Summary:
    """`progress` is told the bytes of each file done (read, unchanged or skipped)."""
    sources = [f if isinstance(f, Source) else _source(f) for f in files]
    summary = Summary()
    started = time.monotonic()
    stop = stop or threading.Event()
    job = _Job(chunk_tokens, overlap_tokens, text_field, follow_symlinks, max_bytes)
    with store.transaction(), store.interrupt_on(stop):
        try:
            _ingest_files(store, sources, job, progress, summary, warn, strict)
            if embedder is not None:
                _embed(store, embedder)
        except Stopped:
            raise KeyboardInterrupt from None
        except Exception:
            if stop.is_set():  # the statement Ctrl-C ended
                raise KeyboardInterrupt from None
            raise
    summary.seconds = time.monotonic() - started
    return summary


def _embed(store: Writer, embedder: Embedder) -> None:
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


@dataclass(frozen=True)
class _Job:
    size: int
    overlap: int
    text_field: str
    follow: bool
    max_bytes: int
    halt: threading.Event = field(default_factory=threading.Event)  # the command failed


@dataclass
class _Prepared:
    digest: str = ""
    chunks: list[Chunk] | None = None  # None: unchanged (or skipped)
    skip: Skip | None = None
    notes: list[str] = field(default_factory=list)  # .jsonl lines skipped


def _ingest_files(
    store: Writer,
    files: list[Source],
    job: _Job,
    progress: Callable[[int], object] | None,
    summary: Summary,
    warn: Callable[[str], object],
    strict: bool,
) -> None:
    # The settings that shape the chunks are part of what "unchanged" means.
    shape = f"|{job.size}|{job.overlap}|{job.text_field}|{_SHAPE_VERSION}".encode()
    known = store.hashes()

    def prepare(source: Source) -> _Prepared:
        out = _Prepared()
        try:
            raw = _read(source, job)
            out.digest = hashlib.sha256(raw + shape).hexdigest()
            if known.get(source.key) != out.digest:
                out.chunks = _chunks(source.path, raw, job, out.notes)
        except Skip as skip:
            out.skip = skip
        return out

    # The next files are read and chunked on a thread while SQLite indexes this one (it
    # lets go of the GIL while it works): most of an ingest is FTS5's indexing.
    pool = ThreadPoolExecutor(1, thread_name_prefix="kb-ingest")
    ahead: deque[Future[_Prepared]] = deque()
    queued = iter(files)
    try:
        for source in files:
            while len(ahead) < PREFETCH and (nxt := next(queued, None)) is not None:
                ahead.append(pool.submit(prepare, nxt))
            item = ahead.popleft().result()
            for note in item.notes:
                if strict:
                    raise IngestError(f"{note} (--strict)")
                warn(f"{note}, line skipped")
                summary.lines_skipped += 1
            if item.skip is not None:
                if strict:
                    raise IngestError(f"{item.skip} (--strict)")
                warn(f"{item.skip}, skipped")
                summary.skipped[item.skip.reason] += 1
            elif item.chunks is None:
                summary.unchanged += 1
            else:
                store.replace(source.key, item.digest, source.size, item.chunks, name=source.name)
                summary.files += 1
                summary.chunks += len(item.chunks)
                summary.bytes += source.size
            if progress is not None:
                progress(source.size)
    except BaseException:
        job.halt.set()  # whatever the worker is chunking ends at once
        raise
    finally:
        for future in ahead:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


def _read(source: Source, job: _Job) -> bytes:
    """The file scanned, and only it: not through a link (unless following them), a
    regular file, the same one, no larger than the cap."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if job.follow else os.O_NOFOLLOW)
    try:
        fd = os.open(source.path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Skip("symlink", f"{source.path}: symlink") from None
        raise Skip("unreadable", f"{source.path}: cannot read ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != source.ident:
            raise Skip("changed", f"{source.path}: replaced while being read")
        with os.fdopen(os.dup(fd), "rb") as file:
            raw = file.read(job.max_bytes + 1)
    except OSError as exc:
        raise Skip("unreadable", f"{source.path}: cannot read ({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(raw) > job.max_bytes:
        reason, message = _too_large(source.path, len(raw), job.max_bytes)
        raise Skip(reason, message.removesuffix(", skipped"))
    return raw


def _chunks(path: Path, raw: bytes, job: _Job, notes: list[str]) -> list[Chunk]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return list(_jsonl_chunks(path, raw, job, notes))
    if suffix == ".pdf":
        sections: Iterable[Section] = _pdf_sections(path, raw, job.halt)
    else:
        if not suffix and b"\0" in raw[:8192]:
            raise Skip("binary", f"{path}: binary, not text")
        text = _decode(path, raw, suffix in _HTML)
        del raw
        if suffix in _HTML:
            text = _html_text(text)
        sections = iter_sections(_drop_data_uris(text))
    return chunk_sections(sections, job.size, job.overlap, job.halt)


def _drop_data_uris(text: str) -> str:
    return _DATA_URI.sub("", text) if "data:" in text or "DATA:" in text else text


def _declared(raw: bytes) -> str | None:
    """The charset an HTML page (meta) or XHTML file (XML declaration) declares."""
    head = raw[:1024]
    found = _XML_ENCODING.match(head) or _META_CHARSET.search(head)
    if found is None:
        return None
    label = found.group(1).decode("ascii", "replace")
    try:
        return codecs.lookup(label).name
    except LookupError:
        return None


def _decode(path: Path, raw: bytes, html: bool = False) -> str:
    """By its byte-order mark, else the charset it declares (HTML, XML), else UTF-8."""
    codec = next((c for bom, c in _BOMS if raw.startswith(bom)), None)
    if codec is not None:
        raw = raw[len(next(b for b, c in _BOMS if c == codec)) :]
    elif html:
        codec = _declared(raw)
    try:
        return raw.decode(codec or "utf-8")
    except UnicodeDecodeError as exc:
        said = f"{codec} text as declared" if codec else "UTF-8 text"
        raise Skip("encoding", f"{path}: not {said} (byte {exc.start})") from None


def _jsonl_lines(path: Path, raw: bytes) -> Iterator[tuple[int, str | None, str]]:
    """(number, line, why not) a line at a time: a line that is not UTF-8 is one bad
    line, not a bad file (a file with a byte-order mark is decoded whole)."""
    if any(raw.startswith(bom) for bom, codec in _BOMS if codec != "utf-8"):
        # split("\n"), not splitlines(): JSON strings may hold U+2028 and U+0085 unescaped
        for number, line in enumerate(_decode(path, raw).split("\n"), 1):
            yield number, line, ""
        return
    at = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    number = 0
    while at <= len(raw):
        end = raw.find(b"\n", at)
        end = len(raw) if end < 0 else end
        number += 1
        try:
            yield number, raw[at:end].decode("utf-8"), ""
        except UnicodeDecodeError as exc:
            yield number, None, f"not UTF-8 (byte {exc.start})"
        at = end + 1


def _jsonl_chunks(path: Path, raw: bytes, job: _Job, notes: list[str]) -> Iterator[Chunk]:
    field_ = job.text_field
    for number, line, why in _jsonl_lines(path, raw):
        if line is None:
            notes.append(f"{path}:{number}: {why}")
            continue
        if not line.strip():
            continue
        if job.halt.is_set():
            raise Stopped
        try:
            record = json.loads(line)
        except ValueError as exc:
            notes.append(f"{path}:{number}: not JSON ({getattr(exc, 'msg', 'a bad value')})")
            continue
        except RecursionError:
            notes.append(f"{path}:{number}: not JSON (nested too deep)")
            continue
        if not isinstance(record, dict):
            notes.append(f"{path}:{number}: not a JSON object")
            continue
        if not isinstance(record.get(field_), str):
            notes.append(f"{path}:{number}: no string field '{field_}' (--text-field)")
            continue
        meta: dict[str, Any] = {k: v for k, v in record.items() if k != field_}
        meta["line"] = number
        heading = str(record.get("title") or record.get("heading") or "")[:HEADING_CHARS]
        text = _drop_data_uris(record[field_])
        for chunk in chunk_sections([Section(heading, text)], job.size, job.overlap, job.halt):
            yield Chunk(chunk.heading, chunk.text, meta)


def _pdf_sections(path: Path, raw: bytes, stop: threading.Event) -> Iterator[Section]:
    import io

    try:
        from pypdf import PdfReader
    except ImportError:  # pragma: no cover - a declared dependency
        raise IngestError(f"{path}: reading PDF needs the pypdf package") from None
    try:
        reader = PdfReader(io.BytesIO(raw))
        pages = reader.pages
        texts = []
        for page in pages:
            if stop.is_set():
                raise Stopped
            texts.append(page.extract_text() or "")
    except Stopped:
        raise
    except Exception as exc:  # pypdf raises many kinds on a broken file
        raise Skip("unreadable PDF", f"{path}: not a readable PDF ({type(exc).__name__})") from None
    for i, text in enumerate(texts, 1):
        if text.strip():
            yield Section(f"page {i}", _drop_data_uris(text))


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
