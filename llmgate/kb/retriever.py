"""Searching a knowledge base from the server: off the event loop, and cancellable.

SQLite blocks, so each search runs on a small thread pool over read-only connections
kept for reuse. A turn cancelled mid-search (the caller hung up) interrupts its query.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llmgate.kb.store import Hit, KbError, search


class Retriever:
    def __init__(self, name: str, path: Path, workers: int = 2) -> None:
        self.name = name
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"kb-{name}")
        self._idle: list[sqlite3.Connection] = []

    def _connect(self) -> sqlite3.Connection:
        if not self.path.exists():
            raise KbError(f"kb '{self.name}': {self.path} does not exist (run `kb ingest`)")
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)

    def _search(self, conn: sqlite3.Connection | None, question: str, k: int) -> list[Hit]:
        conn = conn or self._connect()
        try:
            return search(conn, question, k)
        finally:
            self._idle.append(conn)

    async def search(self, question: str, k: int) -> list[Hit]:
        conn = self._idle.pop() if self._idle else None
        job = self._pool.submit(self._search, conn, question, k)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            if conn is not None:
                conn.interrupt()  # the query stops; the connection goes back when it has
            raise

    async def aclose(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        while self._idle:
            self._idle.pop().close()
