"""The server's side of a knowledge base: searches on threads, cancelled ones cleaned up."""

from __future__ import annotations

import asyncio
from pathlib import Path

from llmgate.kb.ingest import ingest
from llmgate.kb.retriever import Retriever
from llmgate.kb.store import Store
from llmgate.upstream.watchdog import Watchdog

DATA = Path(__file__).parent / "data"


async def test_hanging_up_on_one_search_never_breaks_another(tmp_path):
    store = Store(tmp_path / "kb.sqlite")
    ingest(store, [DATA / "shop.md"], 60, 10)
    store.close()
    retriever = Retriever("shop", tmp_path / "kb.sqlite")
    question = "refund delivery"
    try:
        expected = await retriever.search(question, 3)
        assert expected
        for _ in range(30):
            tasks = [asyncio.ensure_future(retriever.search(question, 3)) for _ in range(6)]
            await asyncio.sleep(0)
            for task in tasks[::2]:
                task.cancel()  # a caller hangs up mid-search
            results = await asyncio.gather(*tasks[1::2])  # the others' searches stand
            assert all(r == expected for r in results)
        await asyncio.sleep(0.05)
        assert len(retriever._idle) <= 2  # connections came back, and no more than the pool
    finally:
        await retriever.aclose()


async def test_a_watchdog_whose_task_finished_waits_for_the_next_reader():
    async def first_reader() -> Watchdog:
        return Watchdog(0.05, "silent")

    watchdog = await asyncio.ensure_future(first_reader())  # made in a helper task
    await asyncio.sleep(0.12)  # past its limit with nobody reading: nothing to cancel
    assert not watchdog.expired
    watchdog.follow()  # this task reads now
    try:
        await asyncio.sleep(1)
        raise AssertionError("the watchdog did not cancel its reader")
    except asyncio.CancelledError:
        assert watchdog.caused_alone()
    finally:
        watchdog.stop()


async def test_searches_past_the_threads_wait_for_a_connection_never_open_one(tmp_path):
    """Many searches at once use the pool's connections, one a thread: none is opened and
    closed per search (what left freed memory behind in a soak, RSS creeping)."""
    store = Store(tmp_path / "kb.sqlite")
    ingest(store, [DATA / "shop.md"], 60, 10)
    store.close()
    retriever = Retriever("shop", tmp_path / "kb.sqlite", workers=2)
    opened = []
    connect = retriever._connect

    def counted():
        opened.append(1)
        return connect()

    retriever._connect = counted  # type: ignore[method-assign]
    try:
        for _ in range(20):
            tasks = [retriever.search("refund delivery", 3) for _ in range(12)]
            found = await asyncio.gather(*tasks)
            assert all(found)
        assert len(opened) <= 2
    finally:
        await retriever.aclose()
