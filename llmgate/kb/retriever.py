"""Searching a knowledge base from the server: off the event loop, and cancellable.

SQLite blocks, so each search runs on a small thread pool over read-only connections
kept for reuse. A turn cancelled mid-search (the caller hung up) interrupts its query.
With embeddings, the question's vector comes from the provider (on the loop: it is a
network call), BM25 and the dense index each rank `CANDIDATES` chunks, and reciprocal
rank fusion orders them; if the embeddings call fails, BM25 answers alone.

The base is in WAL mode (`Store` makes it so), so a search never waits on `kb ingest`; the
busy timeout is short all the same (`BUSY_TIMEOUT_S`): a turn is never held by the base.
A base that cannot be read is a KbError that says what to do about it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from llmgate.http import OwnSession
from llmgate.kb.base import PROBE, Hit, KbError, KbMissing, holding
from llmgate.kb.embeddings import Embedder, fuse, nearest, question_vector
from llmgate.kb.store import bm25_ranked, distinct, hits, vectors

log = logging.getLogger("llmgate.kb")
CANDIDATES = 50
BUSY_TIMEOUT_S = 0.1


class Retriever:
    """A SQLite base, searched from the server (llmgate.kb.base.Reader)."""

    def __init__(
        self, name: str, path: Path, embedder: Embedder | None = None, workers: int = 2
    ) -> None:
        self.name = name
        self.path = path
        self.embedder = embedder
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"kb-{name}")
        self._workers = workers
        self._idle: list[sqlite3.Connection] = []  # touched on the event loop only
        # A search holds a slot from taking a connection to giving it back: never more
        # connections than threads. (Opening one for each search past the threads, and
        # closing it after, left freed memory behind: RSS crept ~0.2 MB a minute.)
        self._slots = asyncio.Semaphore(workers)
        self._client = OwnSession()  # the question's vector, if there is an embedder
        # the dense index: (chunk ids, their unit vectors as one matrix, the file's mtime)
        self._dense: tuple[np.ndarray, np.ndarray, tuple[int, ...]] | None = None
        self._dense_lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        if not self.path.exists():
            raise KbError(f"kb '{self.name}': {self.path} does not exist (run `kb ingest`)")
        return sqlite3.connect(
            self.path.resolve().as_uri() + "?mode=ro",
            uri=True,
            check_same_thread=False,
            timeout=BUSY_TIMEOUT_S,
        )

    def _unreadable(self, exc: sqlite3.Error) -> KbError:
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            fix = "a writer holds it (a base made before WAL mode? any `kb` command converts it)"
        elif isinstance(exc, sqlite3.OperationalError) and "readonly" in str(exc):
            fix = "an interrupted write left a journal: run `kb stats` once to roll it back"
        else:
            fix = "build it again with `kb ingest` (or restore it)"
        return KbError(f"kb '{self.name}': {self.path} cannot be read ({exc}): {fix}")

    def _run(
        self,
        conn: sqlite3.Connection,
        question: str,
        k: int,
        min_score: float,
        query: np.ndarray | None,
    ) -> list[Hit]:
        """On a pool thread: BM25, or BM25 and the vectors fused; twice `k` fetched so
        that near-duplicates (a page ingested as .md and .html) leave room for others."""
        lexical = [(c, s) for c, s in bm25_ranked(conn, question, CANDIDATES) if s >= min_score]
        if query is not None:
            ids, matrix = self._index(conn)
            if matrix.shape[0] and matrix.shape[1] == query.shape[0]:
                dense = [int(ids[row]) for row in nearest(matrix, query, CANDIDATES)]
                return distinct(hits(conn, fuse([c for c, _ in lexical], dense)[: 2 * k]), k)
            if matrix.shape[0]:
                log.warning(
                    "kb '%s': its vectors have %d dimensions, the question's %d (another "
                    "embedding model?): BM25 alone; ingest again", self.name,
                    matrix.shape[1], query.shape[0],
                )
        return distinct(hits(conn, lexical[: 2 * k]), k)

    def _index(self, conn: sqlite3.Connection) -> tuple[np.ndarray, np.ndarray]:
        """The vectors as one matrix, read again when the base changed on disk (in WAL
        mode a commit changes the -wal file; a checkpoint, the base itself)."""
        mtime = _stamp(self.path) + _stamp(self.path.with_name(self.path.name + "-wal"))
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
        await self._slots.acquire()
        try:
            conn = self._idle.pop() if self._idle else self._connect()
        except BaseException as exc:
            self._slots.release()
            if isinstance(exc, sqlite3.Error):
                raise self._unreadable(exc) from None
            raise
        job = self._pool.submit(self._run, conn, question, k, min_score, query)
        try:
            found = await asyncio.wrap_future(job)
        except sqlite3.Error as exc:
            self._release(conn)
            if isinstance(exc, sqlite3.OperationalError) and str(exc) == "interrupted":
                raise KbError(f"kb '{self.name}': the search was interrupted") from None
            raise self._unreadable(exc) from None
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
        self._idle.append(conn)
        self._slots.release()

    async def _query_vector(self, question: str) -> np.ndarray | None:
        return await question_vector(self.embedder, self._client, question, self.name,
                                     "BM25")

    async def start(self) -> None:
        """Nothing to open: connections are made by the first searches."""

    async def probe(self) -> str:
        return await asyncio.to_thread(self._probe)

    def _probe(self) -> str:
        """(On a thread) the counts, on a read-only connection as the server opens it,
        after one search of the server's own kind (FTS5 is there and answers)."""
        if not self.path.exists():
            raise KbMissing(f"{self.path} does not exist")
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            raise KbError(f"{self.path}: cannot open ({exc})") from None
        try:
            files, chunks = conn.execute(
                "SELECT count(*), coalesce(sum(chunks), 0) FROM sources"
            ).fetchone()
            bm25_ranked(conn, PROBE, 1)
        except sqlite3.Error as exc:
            raise KbError(f"{self.path}: not a knowledge base ({exc})") from None
        finally:
            conn.close()
        if not chunks:
            raise KbMissing(f"{self.path} is empty")
        return holding(chunks, files)

    async def aclose(self) -> None:
        await self._client.aclose()
        self._pool.shutdown(wait=False, cancel_futures=True)
        while self._idle:
            self._idle.pop().close()


def _stamp(path: Path) -> tuple[int, ...]:
    try:
        st = path.stat()
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_size)
