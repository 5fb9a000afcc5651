"""The one place a [kb.NAME]'s `kind` picks its implementation (llmgate.kb.base).

Each kind's module is imported by the first base of that kind: a route without RAG carries
none of them, and a SQLite base none of PostgreSQL's driver.
"""

from __future__ import annotations

import logging

from llmgate.config import HttpKb, KbConfig, Loaded, PostgresKb, SqliteKb
from llmgate.kb.base import KbError, Reader, Writer

log = logging.getLogger("llmgate.kb")


def reader(name: str, kb: KbConfig, loaded: Loaded, embed_timeout_s: float = 2.0) -> Reader:
    """The server's side of `kb` (a question's vector is on the voice path: a dead
    embeddings endpoint costs at most `embed_timeout_s`, then the lexical list alone)."""
    if isinstance(kb, HttpKb):
        from llmgate.kb.remote import HttpRetriever

        return HttpRetriever(name, kb.url, kb.headers, kb.timeout_s)
    from llmgate.kb.embeddings import EmbeddingError, embedder_for

    try:
        embedder = embedder_for(kb, loaded, timeout_s=embed_timeout_s)
    except EmbeddingError as exc:
        log.warning("kb.%s.embeddings: %s; retrieval is lexical alone", name, exc)
        embedder = None
    if isinstance(kb, PostgresKb):
        from llmgate.kb.postgres import PgReader

        return PgReader(name, kb, embedder)
    from llmgate.kb.retriever import Retriever

    return Retriever(name, loaded.path(kb.path), embedder)


def writer(name: str, kb: KbConfig, loaded: Loaded) -> Writer:
    """The `kb` commands' side of `kb`; KbError for a kind llmgate does not fill."""
    if isinstance(kb, SqliteKb):
        from llmgate.kb.store import Store

        return Store(loaded.path(kb.path))
    if isinstance(kb, PostgresKb):
        from llmgate.kb.postgres import PgWriter

        return PgWriter(name, kb)
    raise KbError(f'kb.{name} is a retrieval service (kind = "http"): it has nothing to '
                  "build here; fill it with its own tools")


def where(kb: KbConfig, loaded: Loaded) -> str:
    """Where a base is, for a message: its file, its database (never a password), its URL's
    host."""
    if isinstance(kb, SqliteKb):
        return str(loaded.path(kb.path))
    if isinstance(kb, PostgresKb):
        from llmgate.kb.postgres import describe

        return describe(kb)
    return kb.url.split("://", 1)[-1].split("/", 1)[0]
