"""Documents into chunks that follow their headings and paragraphs.

A document arrives as sections (a heading path and its text). Paragraphs (blank-line
separated) are packed into chunks of about `chunk_tokens` words and at most
`chunk_tokens * CHARS_PER_WORD` characters; a paragraph longer than that is cut into
windows, and a "word" longer than a whole chunk (a URL, a base64 blob) is cut too. Each
chunk after the first of a section starts with the last `overlap_tokens` words of the one
before, so an answer that spans a cut is found whole. Words stand in for tokens.

Everything here is linear in the text: words are walked in place (never sliced off the
front of a list), and sections and paragraphs are cut as slices of the text as they come.
A `stop` event, checked as it goes, ends a long chunking at once (Ctrl-C).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
_BLANK = re.compile(r"\n[ \t]*\n+")
_WORD = re.compile(r"\S+")
CHARS_PER_WORD = 10  # a chunk's bound in characters is chunk_tokens times this
_CHECK_EVERY = 4096  # words between two looks at the stop event


class Stopped(Exception):
    """Chunking was asked to stop (the command was interrupted)."""


@dataclass(frozen=True)
class Section:
    heading: str  # "Guide > Billing > Refunds"; "" before the first heading
    text: str


@dataclass(frozen=True)
class Chunk:
    heading: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)


def markdown_sections(text: str) -> list[Section]:
    """Sections of a markdown (or plain) text, cut at its headings (not inside code)."""
    return list(iter_sections(text))


def iter_sections(text: str) -> Iterator[Section]:
    """markdown_sections one at a time: each section's text is one slice of `text`."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    path: list[tuple[int, str]] = []
    body_start = 0
    fence = ""
    at = 0
    end = len(text)
    while at <= end:
        nl = text.find("\n", at)
        if nl < 0:
            nl = end
        line = text[at:nl]
        stripped = line.lstrip()
        if fence and stripped.startswith(fence):
            fence = ""
        elif not fence and stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
        fenced = bool(fence) or stripped.startswith(("```", "~~~"))
        match = None if fenced or not stripped.startswith("#") else _HEADING.match(line)
        if match is not None:
            body = text[body_start:at].strip()
            if body:
                yield Section(" > ".join(t for _, t in path), body)
            level = len(match.group(1))
            path = [(lv, t) for lv, t in path if lv < level] + [(level, match.group(2).strip())]
            body_start = nl + 1
        at = nl + 1
    body = text[body_start:].strip()
    if body:
        yield Section(" > ".join(t for _, t in path), body)


def chunk_sections(
    sections: Iterable[Section],
    chunk_tokens: int,
    overlap_tokens: int,
    stop: threading.Event | None = None,
) -> list[Chunk]:
    chunks: list[Chunk] = []
    overlap = min(overlap_tokens, chunk_tokens // 2)
    for section in sections:
        for text in _pack(section.text, chunk_tokens, overlap, chunk_tokens * CHARS_PER_WORD, stop):
            chunks.append(Chunk(section.heading, text))
    return chunks


def _paragraphs(text: str) -> Iterator[str]:
    start = 0
    for blank in _BLANK.finditer(text):
        yield text[start : blank.start()]
        start = blank.end()
    yield text[start:]


def _pieces(paragraph: str, max_chars: int) -> Iterator[str]:
    """The paragraph's words, in place; a word longer than a chunk cut into pieces."""
    words: Iterable[str] = (
        paragraph.split()
        if len(paragraph) <= max_chars
        else (m.group() for m in _WORD.finditer(paragraph))
    )
    for word in words:
        if len(word) <= max_chars:
            yield word
        else:
            for at in range(0, len(word), max_chars):
                yield word[at : at + max_chars]


def _pack(
    text: str, size: int, overlap: int, max_chars: int, stop: threading.Event | None = None
) -> Iterator[str]:
    """Paragraphs packed into chunks of at most `size` words and `max_chars` characters,
    each starting with the last `overlap` words of the one before."""
    current: list[str] = []  # words of the chunk being filled
    length = -1  # characters of " ".join(current)
    fresh = 0  # words in `current` that no chunk has held yet
    seen = 0

    def tail() -> tuple[list[str], int]:
        kept = current[-overlap:] if overlap else []
        chars = sum(map(len, kept)) + len(kept) - 1
        while kept and chars > max_chars // 2:
            chars -= len(kept.pop(0)) + 1
        return kept, chars

    for paragraph in _paragraphs(text):
        if stop is not None and stop.is_set():
            raise Stopped
        if fresh and len(paragraph) <= max_chars:
            words = paragraph.split()
            chars = sum(map(len, words)) + len(words) - 1
            if words and (len(current) + len(words) > size or length + 1 + chars > max_chars):
                yield " ".join(current)  # the paragraph starts the next chunk
                current, length = tail()
                fresh = 0
        for word in _pieces(paragraph, max_chars):
            if len(current) >= size or length + 1 + len(word) > max_chars:
                if fresh:
                    yield " ".join(current)
                    current, length = tail()
                    fresh = 0
                if length + 1 + len(word) > max_chars:  # the overlap leaves no room
                    current, length = [], -1
            current.append(word)
            length += 1 + len(word)
            fresh += 1
            seen += 1
            if seen % _CHECK_EVERY == 0 and stop is not None and stop.is_set():
                raise Stopped
    if fresh:
        yield " ".join(current)
