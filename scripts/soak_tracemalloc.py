"""What llmgate keeps per turn: scripts/soak.py's calls against llmgate run in this process,
under tracemalloc, with snapshots compared between checkpoints.

    .venv/bin/python scripts/soak_tracemalloc.py --route rag --turns 1000,4000,7000
    .venv/bin/python scripts/soak_tracemalloc.py --route plain --turns 1000,4000,7000

llmgate is built as `python -m llmgate` builds it (llmgate.config.parse, app.create_app,
llmgate.server.serve's listen/start, gc.freeze, uvloop) and served on 127.0.0.1; the mock
upstream is a subprocess. At each checkpoint (a turn count): a tracemalloc snapshot, the
traced and RSS totals, SQLite's own heap (sqlite3_memory_used), glibc's arenas (mallinfo2),
gc-tracked objects by type, and the sizes of llmgate's long-lived tables. Between each pair of
checkpoints: the allocation sites (file:line, and the traceback of the largest) that grew
most. A site that grows by the same amount per turn in every interval is kept per turn; one
that grew once is warm-up. Nothing here is llmgate's to change: it only reads.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import ctypes.util
import dataclasses
import gc
import itertools
import json
import linecache
import os
import sys
import tempfile
import time
import tomllib
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soak
from bench import Proc, build_kb, free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):
        return None


def _sqlite_memory():
    """sqlite3_memory_used from the library _sqlite3 is linked to (its own heap: page cache,
    statements, FTS5), or None."""
    import _sqlite3

    for name in (_sqlite3.__file__, ctypes.util.find_library("sqlite3")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            fn = lib.sqlite3_memory_used
            fn.restype = ctypes.c_int64
            return fn
        except (OSError, AttributeError):
            continue
    return None


LIBC = _libc()
SQLITE_MEM = _sqlite_memory()
COUNTS: collections.Counter = collections.Counter()


def count_kb_connections() -> None:
    """Count the retriever's connections opened and closed (a wrapper in this process)."""
    from llmgate.kb.retriever import Retriever

    connect, release = Retriever._connect, Retriever._release

    def counted_connect(self):
        COUNTS["sqlite_connects"] += 1
        return connect(self)

    def counted_release(self, conn):
        if len(self._idle) >= self._workers:
            COUNTS["sqlite_closes"] += 1
        return release(self, conn)

    Retriever._connect, Retriever._release = counted_connect, counted_release


def tables(app) -> dict:
    """Sizes of the long-lived structures a leak would sit in."""
    import re

    from llmgate.app import LIVE
    from llmgate.obs import metrics
    from llmgate.turn import CHANNELS

    gen = app[LIVE].current
    out = {
        "channels_live": len(app[CHANNELS]._live),
        "metrics_children": len(metrics._children),
        "re_cache": len(re._cache) if hasattr(re, "_cache") else None,
        "in_flight": len(gen.in_flight),
        "asyncio_tasks": len(asyncio.all_tasks()),
    }
    for name, retriever in gen.retrievers.items():
        pool = getattr(retriever, "_pool", None)
        out[f"kb_{name}_idle_conns"] = len(getattr(retriever, "_idle", ()))
        if pool is not None:
            out[f"kb_{name}_pool_threads"] = len(pool._threads)
            out[f"kb_{name}_pool_queue"] = pool._work_queue.qsize()
    return out


def checkpoint(label: str, turns: int, gw: Proc, app, trim: bool) -> dict:
    gc.collect()
    snap = None
    info = {"label": label, "turns": turns, "rss_mb": round(gw.rss_mb(), 2)}
    if tracemalloc.is_tracing():
        snap = tracemalloc.take_snapshot().filter_traces(
            (
                tracemalloc.Filter(False, tracemalloc.__file__),
                tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
                tracemalloc.Filter(False, linecache.__file__),
            )
        )
        traced, _peak = tracemalloc.get_traced_memory()
        info["traced_mb"] = round(traced / 2**20, 3)
        info["tracemalloc_own_mb"] = round(tracemalloc.get_tracemalloc_memory() / 2**20, 3)
    info.update(COUNTS)
    if SQLITE_MEM is not None:
        info["sqlite_heap_mb"] = round(SQLITE_MEM() / 2**20, 3)
    if LIBC is not None:
        m = LIBC.mallinfo2()
        info.update(
            malloc_arena_mb=round(m.arena / 2**20, 2),
            malloc_in_use_mb=round(m.uordblks / 2**20, 2),
            malloc_free_mb=round(m.fordblks / 2**20, 2),
            malloc_mmap_mb=round(m.hblkhd / 2**20, 2),
        )
    if trim and LIBC is not None:  # what RSS is only the allocator's, given back
        LIBC.malloc_trim(0)
        info["rss_after_malloc_trim_mb"] = round(gw.rss_mb(), 2)
    info["tables"] = tables(app)
    counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    return {"info": info, "snapshot": snap, "types": counts}


def _short(filename: str) -> str:
    for marker in ("/site-packages/", "/work/main/", "/lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def compare(a: dict, b: dict, top: int) -> dict:
    turns = max(b["info"]["turns"] - a["info"]["turns"], 1)
    ia, ib = a["info"], b["info"]
    delta = {k: round(ib[k] - ia[k], 3) for k in ib if isinstance(ib[k], int | float)}
    delta["tables"] = {
        k: v - ia["tables"].get(k, 0)
        for k, v in ib["tables"].items()
        if isinstance(v, int) and isinstance(ia["tables"].get(k, 0), int)
    }
    per_1000 = {k: round(v * 1000 * 1024 / turns, 1) for k, v in delta.items() if k.endswith("_mb")}
    if a["snapshot"] is None or b["snapshot"] is None:
        return {
            "from": ia["label"],
            "to": ib["label"],
            "turns": turns,
            "delta": delta,
            "kb_per_1000_turns": per_1000,
            "sites": [],
            "tracebacks": [],
            "gc_types_grew": [],
        }
    by_line = b["snapshot"].compare_to(a["snapshot"], "lineno")
    lines = []
    for stat in by_line[:top]:
        frame = stat.traceback[0]
        lines.append(
            {
                "site": f"{_short(frame.filename)}:{frame.lineno}",
                "code": linecache.getline(frame.filename, frame.lineno).strip()[:100],
                "grew_kb": round(stat.size_diff / 1024, 1),
                "bytes_per_turn": round(stat.size_diff / turns, 1),
                "blocks_grew": stat.count_diff,
                "blocks_per_1000_turns": round(stat.count_diff * 1000 / turns, 1),
            }
        )
    by_tb = b["snapshot"].compare_to(a["snapshot"], "traceback")
    tracebacks = []
    for stat in by_tb[: max(top // 2, 3)]:
        tracebacks.append(
            {
                "grew_kb": round(stat.size_diff / 1024, 1),
                "blocks_grew": stat.count_diff,
                "stack": [
                    f"{_short(f.filename)}:{f.lineno} "
                    f"{linecache.getline(f.filename, f.lineno).strip()[:90]}"
                    for f in stat.traceback
                ][:12],
            }
        )
    types = [
        (name, b["types"][name] - a["types"].get(name, 0))
        for name in b["types"]
        if b["types"][name] - a["types"].get(name, 0) > 0
    ]
    types.sort(key=lambda t: -t[1])
    return {
        "from": ia["label"],
        "to": ib["label"],
        "turns": turns,
        "delta": delta,
        "kb_per_1000_turns": per_1000,
        "sites": lines,
        "tracebacks": tracebacks,
        "gc_types_grew": types[:15],
    }


async def serve_and_drive(args, workdir: Path, mock_port: int) -> dict:
    from llmgate.app import create_app
    from llmgate.config import parse
    from llmgate.obs import logging as llmlog
    from llmgate.server import serve

    port = free_port()
    text = soak.config_text(port, mock_port)
    (workdir / "soak.toml").write_text(text)
    loaded = dataclasses.replace(parse(tomllib.loads(text), os.environ), base_dir=workdir)
    llmlog.setup("json", "info")
    log_file = open(workdir / "llmgate.log", "w")  # noqa: SIM115
    import logging

    logging.getLogger("llmgate").handlers[0].setStream(log_file)
    app = create_app(loaded)
    gc.collect()
    gc.freeze()
    sock = serve.listen("127.0.0.1", port, 30.0)
    runner = await serve.start(app, sock, drain_s=2.0)
    gw = Proc(os.getpid())
    marks = [int(t) for t in args.turns.split(",")]
    points: list[dict] = []
    pending = list(marks)
    tally = soak.Tally()

    def on_turn(turns: int) -> None:
        if pending and turns >= pending[0]:
            mark = pending.pop(0)
            started = time.monotonic()
            points.append(checkpoint(f"turn {mark}", turns, gw, app, args.trim))
            print(
                f"soak_tracemalloc: checkpoint at turn {turns}: {points[-1]['info']} "
                f"({time.monotonic() - started:.1f} s)",
                file=sys.stderr,
                flush=True,
            )

    tally.on_turn.append(on_turn)
    opts = soak.Options(
        calls=args.calls,
        seconds=args.max_minutes * 60,
        routes=soak.ROUTES[args.route],
        think_ms=soak._range(args.think_ms),
        max_turns=marks[-1],
        seed=args.seed,
    )
    questions = soak.load_questions(workdir)
    started = time.monotonic()
    await soak.run_calls(f"http://127.0.0.1:{port}", questions, opts, tally)
    elapsed = time.monotonic() - started
    await asyncio.sleep(0.5)
    await runner.cleanup()
    log_file.flush()
    result = {
        "route": args.route,
        "kb_chunks": args.kb_chunks,
        "calls": args.calls,
        "turns": tally.turns,
        "turns_per_s": round(tally.turns / elapsed, 1),
        "caller_outcomes": dict(sorted(tally.outcomes.items())),
        "log": soak.read_log(workdir / "llmgate.log"),
        "checkpoints": [p["info"] for p in points],
        "intervals": [compare(a, b, args.top) for a, b in itertools.pairwise(points)],
    }
    return result


def print_result(r: dict) -> None:
    traced = "traced" if r["checkpoints"] and "traced_mb" in r["checkpoints"][0] else "untraced"
    print(f"route {r['route']}: {r['turns']} turns, {r['turns_per_s']} turns/s ({traced})")
    print("statuses:", r["log"]["statuses"], "errors:", r["log"]["errors"])
    for c in r["checkpoints"]:
        print("checkpoint", json.dumps(c))
    for iv in r["intervals"]:
        print(
            f"\n== {iv['from']} -> {iv['to']} ({iv['turns']} turns): KB per 1000 turns "
            f"{iv['kb_per_1000_turns']}"
        )
        print(f"   tables delta: {iv['delta'].get('tables', '')}")
        for s in iv["sites"]:
            print(
                f"   {s['grew_kb']:>9} KB {s['bytes_per_turn']:>8} B/turn "
                f"{s['blocks_per_1000_turns']:>8} blk/1000t  {s['site']}  {s['code']}"
            )
        print("   gc types grew:", iv["gc_types_grew"])
        for t in iv["tracebacks"][:4]:
            print(f"   -- {t['grew_kb']} KB, {t['blocks_grew']} blocks:")
            for line in t["stack"]:
                print(f"        {line}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--route", choices=tuple(soak.ROUTES), default="rag")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--turns", default="1000,4000,7000", help="checkpoints (turn counts)")
    p.add_argument("--think-ms", default="50-250")
    p.add_argument("--kb-chunks", type=int, default=3000)
    p.add_argument("--frames", type=int, default=12, help="tracemalloc frames kept")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--max-minutes", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--no-trace", action="store_true", help="RSS and counters only (fast)")
    p.add_argument("--trim", action="store_true", help="malloc_trim(0) at each checkpoint")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    os.chdir(ROOT)
    workdir = Path(tempfile.mkdtemp(prefix="llmgate-soak-tm-"))
    build_kb(workdir, args.kb_chunks)
    mock, mock_port = soak.start_mock()
    count_kb_connections()
    if not args.no_trace:
        tracemalloc.start(args.frames)
    try:
        if args.no_uvloop:
            result = asyncio.run(serve_and_drive(args, workdir, mock_port))
        else:
            import uvloop

            result = uvloop.run(serve_and_drive(args, workdir, mock_port))
    finally:
        mock.terminate()
        mock.wait(timeout=10)
    print_result(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
