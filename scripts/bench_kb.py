"""The knowledge base's stores side by side: `scripts/bench rag --kind postgres`.

The corpus of scripts/bench's rag scenario (100,000 chunks of Zipf-distributed words, 26 MB;
--chunks to change it) goes into a SQLite base and a PostgreSQL one (a real server from the
`pgserver` wheel of the test extra, started here on 127.0.0.1 and stopped by PID), each with
`kb ingest` as a user runs it: ingest MB/s. Then every chunk gets a vector (256 dimensions,
a hash of its words: a stand-in for an embeddings endpoint, whose time is not the store's),
and each store answers the same questions through the reader the RAG stage uses, lexical
and hybrid, one at a time (c1) and twenty at once (c20): p50 and p99 in ms, and the
longest the event loop went without running (a search that blocked it would show there,
and a stream's first token on another route would wait as long).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

DIMS = 256


def vector(text: str) -> np.ndarray:
    out = np.zeros(DIMS, np.float32)
    for word in re.findall(r"\w+", text.lower()):
        out[int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest()) % DIMS] += 1
    norm = np.linalg.norm(out)
    return out / norm if norm else out


class LocalEmbedder:
    """The reader's embedder, answering at once (the store is what is measured)."""

    async def embed(self, session, texts):
        return np.stack([vector(t) for t in texts])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


async def measure(reader, questions: list[str], concurrency: int, n: int) -> dict:
    times: list[float] = []
    found = 0
    gap = 0.0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal gap
        loop = asyncio.get_running_loop()
        last = loop.time()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = loop.time()
            gap = max(gap, now - last)
            last = now

    todo = iter(range(n))

    async def worker() -> None:
        nonlocal found
        for i in todo:
            start = time.perf_counter()
            hits = await reader.search(questions[i % len(questions)], 3)
            times.append((time.perf_counter() - start) * 1000)
            found += bool(hits)

    tick = asyncio.ensure_future(ticker())
    for _ in range(20):  # warm
        await reader.search(questions[-1], 3)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    stop.set()
    await tick
    return {"p50_ms": pct(times, 0.5), "p99_ms": pct(times, 0.99),
            "answered": round(found / n, 3), "loop_gap_ms": round(gap * 1000, 1)}


def kb_cli(config: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmgate", "kb", args[0], "--config",
                           str(config), "--kb", name, *args[1:]],
                          check=True, capture_output=True, text=True, cwd=HERE.parent)


def add_vectors(writer) -> float:
    started = time.monotonic()
    missing = writer.without_vectors()
    with writer.transaction():
        for start in range(0, len(missing), 2048):
            part = missing[start : start + 2048]
            writer.set_vectors([(vector(text).tobytes(), chunk) for chunk, text in part])
    return time.monotonic() - started


def run(chunks: int, json_path: str | None) -> int:
    try:
        from tests.pg_server import PgServer
    except ImportError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    import importlib.util

    if importlib.util.find_spec("pgserver") is None:
        print("bench: --kind postgres needs the test extra's pgserver: "
              ".venv/bin/pip install -e '.[test]' (scripts/test does it)", file=sys.stderr)
        return 1
    from bench import synthetic_docs

    from llmgate.config import PostgresKb
    from llmgate.kb.postgres import PgReader, PgWriter
    from llmgate.kb.retriever import Retriever
    from llmgate.kb.store import Store

    work = Path(tempfile.mkdtemp(prefix="llmgate-bench-kb-"))
    docs = work / "docs"
    docs.mkdir()
    questions = synthetic_docs(chunks)(docs, random.Random(1))
    size = sum(p.stat().st_size for p in docs.iterdir())
    server = PgServer()
    server.start()
    results: dict = {"chunks": chunks, "corpus_mb": round(size / 2**20, 1)}
    try:
        config = work / "kb.toml"
        config.write_text(
            '[providers.none]\nbase_url = "http://127.0.0.1:9/v1"\n'
            '[kb.lite]\npath = "kb.sqlite"\nchunk_tokens = 60\noverlap_tokens = 0\n'
            f'[kb.pg]\nkind = "postgres"\ndsn = "{server.dsn}"\ntable = "bench"\n'
            "chunk_tokens = 60\noverlap_tokens = 0\n"
        )
        for kind, name in (("sqlite", "lite"), ("postgres", "pg")):
            print(f"ingesting {results['corpus_mb']} MB into {kind} ...", file=sys.stderr,
                  flush=True)
            started = time.monotonic()
            kb_cli(config, name, "ingest", str(docs))
            seconds = time.monotonic() - started
            stats = kb_cli(config, name, "stats").stdout
            results[kind] = {"ingest_s": round(seconds, 1),
                             "ingest_mb_per_s": round(size / 2**20 / seconds, 2),
                             "kb_chunks": int(re.search(r"(\d+) chunks", stats)[1])}
        print("adding vectors ...", file=sys.stderr, flush=True)
        lite = Store(work / "kb.sqlite")
        results["sqlite"]["vectors_s"] = round(add_vectors(lite), 1)
        lite.close()
        pg = PgWriter("pg", PostgresKb(dsn=server.dsn, table="bench"))
        results["postgres"]["vectors_s"] = round(add_vectors(pg), 1)
        started = time.monotonic()
        pg.close()  # builds the HNSW index
        results["postgres"]["hnsw_build_s"] = round(time.monotonic() - started, 1)

        async def searches() -> None:
            pg_kb = PostgresKb(dsn=server.dsn, table="bench", pool_max=20, timeout_ms=5000)
            readers = {
                "sqlite": lambda e: Retriever("lite", work / "kb.sqlite", e),
                "postgres": lambda e: PgReader("pg", pg_kb, e),
            }
            for kind, make in readers.items():
                for mode, embedder in (("lexical", None), ("hybrid", LocalEmbedder())):
                    reader = make(embedder)
                    await reader.start()
                    try:
                        for c, n in ((1, 500), (20, 2000)):
                            print(f"{kind} {mode} c{c} ...", file=sys.stderr, flush=True)
                            results[kind][f"{mode}_c{c}"] = await measure(reader, questions,
                                                                          c, n)
                    finally:
                        await reader.aclose()

        asyncio.run(searches())
    finally:
        server.remove()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    _print(results)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _print(results: dict) -> None:
    print(f"\n{results['chunks']:,} chunks, {results['corpus_mb']} MB")
    print(f"{'':24}{'sqlite':>26}{'postgres':>26}")
    lite, pg = results["sqlite"], results["postgres"]
    print(f"{'ingest MB/s':24}{lite['ingest_mb_per_s']:>26}{pg['ingest_mb_per_s']:>26}")
    print(f"{'vectors stored (s)':24}{lite['vectors_s']:>26}{pg['vectors_s']:>26}")
    print(f"{'HNSW built (s)':24}{'-':>26}{pg['hnsw_build_s']:>26}")
    def cell(m: dict) -> str:
        return f"{m['p50_ms']}/{m['p99_ms']} ms gap {m['loop_gap_ms']}"

    for key in ("lexical_c1", "lexical_c20", "hybrid_c1", "hybrid_c20"):
        print(f"{key + ' p50/p99':24}{cell(lite[key]):>26}{cell(pg[key]):>26}")


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    return run(args.chunks, args.json)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
