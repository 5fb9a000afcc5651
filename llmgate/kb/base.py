"""What a knowledge base is to the rest of llmgate, whichever kind serves it.

    Reader   the server's side (the RAG stage, `check`, `kb search`): start, search, probe,
             aclose. SQLite (llmgate.kb.retriever), PostgreSQL (llmgate.kb.postgres) and a
             retrieval service of the operator's own (llmgate.kb.remote) each implement it.
    Writer   the `kb` commands' side (ingest, remove, list, stats, copy): SQLite and
             PostgreSQL; a retrieval service is filled by its owner.

Each backend translates its own driver's errors into `KbError` (a message that names the
base and says what to do, never a password, a DSN or a server path it was not given as
such): the RAG stage catches `KbError` alone, logs it, and answers "nothing found".
llmgate.kb.bases is the one place a `kind` picks its implementation.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from llmgate.kb.chunking import Chunk


@dataclass(frozen=True)
class Hit:
    """One passage, the same shape whichever store served it."""

    score: float  # higher is better (BM25, ts_rank_cd, or a fused rank)
    source: str  # the source's name (relative to the folder ingested), never a server path
    heading: str
    text: str
    meta: dict[str, Any]


class KbError(Exception):
    """A knowledge base that cannot be used; the message says which and why."""


class KbMissing(KbError):
    """A base with nothing in it yet (never ingested, or emptied): `kb ingest` fills it."""


PROBE = "llmgate check"  # the harmless question a probe asks


def holding(chunks: int, sources: int) -> str:
    """What a probe says a base holds: "2 chunks from 1 source"."""
    return (f"{chunks:,} chunk{'' if chunks == 1 else 's'} from "
            f"{sources:,} source{'' if sources == 1 else 's'}")


@dataclass(frozen=True)
class Exported:
    """One source of a base with its chunks and their vectors (`kb copy`)."""

    path: str
    digest: str
    size: int
    name: str
    chunks: list[Chunk]
    vectors: list[bytes] | None  # float32, one a chunk; None: the base has none for it


class Reader(Protocol):
    name: str

    async def start(self) -> None:
        """Open what searching needs (a pool). A server that is down is logged, not
        raised: the route answers "nothing found" until it is back."""

    async def search(self, question: str, k: int, min_score: float = 0.0) -> list[Hit]:
        """The best `k` passages, best first; KbError (and nothing else) when it cannot."""
        ...

    async def probe(self) -> str:
        """For `check`: what the base holds ("1,204 chunks from 12 sources"); KbError
        saying what to do when it is missing, empty or unreachable."""
        ...

    async def aclose(self) -> None: ...


class Writer(Protocol):
    """A base opened for writing, from a `kb` command (blocking calls, off any loop)."""

    where: str  # for messages: the file, or "postgresql host:port/db table T" (no password)

    def transaction(self) -> AbstractContextManager[None]:
        """One command's writes: all or none (SQLite), or each source's `replace` in its
        own (PostgreSQL): either way an interrupted command leaves every source whole or
        absent."""
        ...

    def interrupt_on(self, stop: threading.Event) -> AbstractContextManager[None]:
        """While inside, `stop` being set ends the statement running (Ctrl-C)."""
        ...

    def hashes(self) -> dict[str, str]: ...

    def replace(
        self,
        source: str,
        digest: str,
        size: int,
        chunks: Sequence[Chunk],
        vecs: Sequence[bytes] | None = None,
        name: str | None = None,
    ) -> None: ...

    def remove(self, source: str) -> bool: ...

    def without_vectors(self) -> list[tuple[int, str]]: ...

    def set_vectors(self, rows: Sequence[tuple[bytes, int]]) -> None:
        """(float32 vector bytes, chunk id) pairs."""

    def sources(self) -> list[tuple[str, int, int]]:
        """(path, bytes, chunks) for every source, by path."""
        ...

    def stats(self) -> dict[str, int]:
        """files, chunks, bytes (of text), file_bytes (on disk)."""
        ...

    def export(self) -> Iterator[Exported]: ...

    def close(self) -> None: ...
