"""Searching a knowledge base from the server: off the event loop, and cancellable.

SQLite blocks, so each search runs on a small thread pool over read-only connections
kept for reuse. A turn cancelled mid-search (the caller hung up) interrupts its query.
With embeddings, the question's vector comes from the provider (on the loop: it is a
network call), BM25 and the dense index each rank `CANDIDATES` chunks, and reciprocal
rank fusion orders them; if the embeddings call fails, BM25 answers alone.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import numpy as np

from llmgate.kb.embeddings import Embedder, EmbeddingError, fuse, nearest
from llmgate.kb.store import Hit, KbError, bm25_ranked, hits, search, vectors

log = logging.getLogger("llmgate.kb")
CANDIDATES = 50


class Retriever:
    def __init__(
        self, name: str, path: Path, embedder: Embedder | None = None, workers: int = 2
    ) -> None:
        self.name = name
        self.path = path
        self.embedder = embedder
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"kb-{name}")
        self._idle: list[sqlite3.Connection] = []
        self._session: aiohttp.ClientSession | None = None
        # the dense index: chunk ids, their unit vectors as one matrix, the file's mtime
        self._dense: tuple[np.ndarray, np.ndarray, float] | None = None

    def _connect(self) -> sqlite3.Connection:
        if not self.path.exists():
            raise KbError(f"kb '{self.name}': {self.path} does not exist (run `kb ingest`)")
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)

    def _run(self, conn: sqlite3.Connection | None, question: str, k: int, query) -> list[Hit]:
        conn = conn or self._connect()
        try:
            if query is None:
                return search(conn, question, k)
            lexical = [chunk for chunk, _ in bm25_ranked(conn, question, CANDIDATES)]
            ids, matrix = self._index(conn)
            dense = [int(ids[row]) for row in nearest(matrix, query, CANDIDATES)]
            return hits(conn, fuse(lexical, dense)[:k])
        finally:
            self._idle.append(conn)

    def _index(self, conn: sqlite3.Connection) -> tuple[np.ndarray, np.ndarray]:
        """The vectors as one matrix, read again when the base changed on disk."""
        mtime = self.path.stat().st_mtime
        if self._dense is None or self._dense[2] != mtime:
            chunk_ids, blobs = vectors(conn)
            matrix = (
                np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), -1)
                if blobs
                else np.zeros((0, 1), np.float32)
            )
            self._dense = (np.array(chunk_ids), matrix, mtime)
        return self._dense[0], self._dense[1]

    async def search(self, question: str, k: int) -> list[Hit]:
        query = await self._query_vector(question)
        conn = self._idle.pop() if self._idle else None
        job = self._pool.submit(self._run, conn, question, k, query)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            if conn is not None:
                conn.interrupt()  # the query stops; the connection goes back when it has
            raise

    async def _query_vector(self, question: str) -> np.ndarray | None:
        if self.embedder is None:
            return None
        if self._session is None:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        try:
            return (await self.embedder.embed(self._session, [question]))[0]
        except EmbeddingError as exc:
            log.warning("kb '%s': no question vector, BM25 alone: %s", self.name, exc)
            return None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        while self._idle:
            self._idle.pop().close()
