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
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from llmgate.kb.embeddings import Embedder, EmbeddingError, fuse, nearest
from llmgate.kb.service import OwnSession
from llmgate.kb.store import Hit, KbError, bm25_ranked, hits, vectors

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
        self._workers = workers
        self._idle: list[sqlite3.Connection] = []  # touched on the event loop only
        self._client = OwnSession()  # the question's vector, if there is an embedder
        # the dense index: (chunk ids, their unit vectors as one matrix, the file's mtime)
        self._dense: tuple[np.ndarray, np.ndarray, float] | None = None
        self._dense_lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        if not self.path.exists():
            raise KbError(f"kb '{self.name}': {self.path} does not exist (run `kb ingest`)")
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)

    def _run(
        self,
        conn: sqlite3.Connection,
        question: str,
        k: int,
        min_score: float,
        query: np.ndarray | None,
    ) -> list[Hit]:
        """On a pool thread: BM25, or BM25 and the vectors fused."""
        lexical = [(c, s) for c, s in bm25_ranked(conn, question, CANDIDATES) if s >= min_score]
        if query is not None:
            ids, matrix = self._index(conn)
            if matrix.shape[0] and matrix.shape[1] == query.shape[0]:
                dense = [int(ids[row]) for row in nearest(matrix, query, CANDIDATES)]
                return hits(conn, fuse([c for c, _ in lexical], dense)[:k])
            if matrix.shape[0]:
                log.warning(
                    "kb '%s': its vectors have %d dimensions, the question's %d (another "
                    "embedding model?): BM25 alone; ingest again", self.name,
                    matrix.shape[1], query.shape[0],
                )
        return hits(conn, lexical[:k])

    def _index(self, conn: sqlite3.Connection) -> tuple[np.ndarray, np.ndarray]:
        """The vectors as one matrix, read again when the base changed on disk."""
        mtime = self.path.stat().st_mtime
        with self._dense_lock:
            dense = self._dense
            if dense is None or dense[2] != mtime:
                chunk_ids, blobs = vectors(conn)
                sizes = {len(b) for b in blobs}
                if len(sizes) > 1:
                    raise KbError(f"kb '{self.name}': vectors of different sizes; ingest again")
                matrix = (
                    np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), -1)
                    if blobs
                    else np.zeros((0, 0), np.float32)
                )
                dense = self._dense = (np.array(chunk_ids), matrix, mtime)
        return dense[0], dense[1]

    async def search(self, question: str, k: int, min_score: float = 0.0) -> list[Hit]:
        query = await self._query_vector(question)
        conn = self._idle.pop() if self._idle else self._connect()
        job = self._pool.submit(self._run, conn, question, k, min_score, query)
        try:
            found = await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            # The caller left: stop this search's own query (not one that took the
            # connection after it), and take the connection back once the thread is done.
            if not job.cancel() and job.running():
                conn.interrupt()
            loop = asyncio.get_running_loop()
            job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release, conn))
            raise
        except BaseException:
            self._release(conn)
            raise
        self._release(conn)
        return found

    def _release(self, conn: sqlite3.Connection) -> None:
        if len(self._idle) < self._workers:
            self._idle.append(conn)
        else:
            conn.close()

    async def _query_vector(self, question: str) -> np.ndarray | None:
        if self.embedder is None:
            return None
        try:
            return (await self.embedder.embed(self._client.get(), [question]))[0]
        except EmbeddingError as exc:
            log.warning("kb '%s': no question vector, BM25 alone: %s", self.name, exc)
            return None

    async def aclose(self) -> None:
        await self._client.aclose()
        self._pool.shutdown(wait=False, cancel_futures=True)
        while self._idle:
            self._idle.pop().close()
