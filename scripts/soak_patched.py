"""`python -m llmgate`, with the retriever's SQLite connections held one per pool thread: the
A/B probe for scripts/soak.py --patched (the fix proposed for the RAG route's RSS creep).

llmgate's Retriever.search takes an idle connection or opens a new one on the event loop,
for every search; with more searches in flight than pool threads (2), the extra ones are
opened, read cold, and closed again (about one turn in five at 50 calls). Here each pool
thread opens one connection on first use and keeps it: at most `workers` connections, none
opened per turn. A probe, not the fix: a cancelled search interrupts its thread's connection
(the real fix should make sure it is still running that search).
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmgate.kb import retriever as _retriever

_local = threading.local()


def _thread_conn(self) -> sqlite3.Connection:
    conns = _local.__dict__.setdefault("conns", {})
    conn = conns.get(id(self))
    if conn is None:
        conn = conns[id(self)] = self._connect()
    return conn


async def search(self, question: str, k: int, min_score: float = 0.0):
    query = await self._query_vector(question)
    running: list[sqlite3.Connection] = []

    def work():
        conn = _thread_conn(self)
        running.append(conn)
        try:
            return self._run(conn, question, k, min_score, query)
        finally:
            running.clear()

    job = self._pool.submit(work)
    try:
        return await asyncio.wrap_future(job)
    except sqlite3.Error as exc:
        if isinstance(exc, sqlite3.OperationalError) and str(exc) == "interrupted":
            raise
        raise self._unreadable(exc) from None
    except asyncio.CancelledError:
        if not job.cancel() and running:
            running[0].interrupt()
        raise


_retriever.Retriever.search = search

if __name__ == "__main__":
    from llmgate.cli import main

    sys.exit(main())
