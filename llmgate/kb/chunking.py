"""Documents into chunks that follow their headings and paragraphs.

A document arrives as sections (a heading path and its text). Paragraphs (blank-line
separated) are packed into chunks of about `chunk_tokens` words; a paragraph longer than
that is cut into windows. Each chunk after the first of a section starts with the last
`overlap_tokens` words of the one before, so an answer that spans a cut is found whole.
Words stand in for tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
_BLANK = re.compile(r"\n[ \t]*\n+")


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
    sections: list[Section] = []
    path: list[tuple[int, str]] = []
    lines: list[str] = []

    def close() -> None:
        body = "\n".join(lines).strip()
        if body:
            sections.append(Section(" > ".join(t for _, t in path), body))
        lines.clear()

    fence = ""
    for line in text.splitlines():
        stripped = line.lstrip()
        if fence and stripped.startswith(fence):
            fence = ""
        elif not fence and stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
        fenced = bool(fence) or stripped.startswith(("```", "~~~"))
        match = None if fenced else _HEADING.match(line)
        if match is None:
            lines.append(line)
            continue
        close()
        level = len(match.group(1))
        path = [(lv, t) for lv, t in path if lv < level] + [(level, match.group(2).strip())]
    close()
    return sections


def chunk_sections(
    sections: list[Section], chunk_tokens: int, overlap_tokens: int
) -> list[Chunk]:
    chunks: list[Chunk] = []
    overlap = min(overlap_tokens, chunk_tokens // 2)
    for section in sections:
        for text in _pack(section.text, chunk_tokens, overlap):
            chunks.append(Chunk(section.heading, text))
    return chunks


def _pack(text: str, size: int, overlap: int) -> list[str]:
    """Paragraphs packed into chunks of about `size` words, each overlapping the last."""
    out: list[str] = []
    current: list[str] = []  # words of the chunk being filled
    for paragraph in _BLANK.split(text):
        words = paragraph.split()
        if not words:
            continue
        if current and len(current) + len(words) > size:
            out.append(" ".join(current))
            current = current[-overlap:] if overlap else []
        while len(current) + len(words) > size:  # a paragraph longer than a chunk
            room = size - len(current)
            current += words[:room]
            words = words[room:]
            out.append(" ".join(current))
            current = current[-overlap:] if overlap else []
        current += words
    if current and (not out or len(current) > overlap):
        out.append(" ".join(current))
    return out
