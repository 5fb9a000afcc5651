"""Instructions llmgate spends on one streamed turn, counted by valgrind's callgrind.

CPU time on a shared VM moves by 20% between runs; instruction counts move by well under
1%, so a change of a few microseconds a stream shows. llmgate runs under callgrind and
relays paced 20-chunk streams (20 ms apart, so each chunk is its own read) from the bench's
mock upstream, one at a time; two runs of N1 and N2 streams, and (I2 - I1) / (N2 - N1) is
the count for one stream, with start-up and shutdown taken out.

    .venv/bin/python scripts/bench_instr.py                  # the working tree
    .venv/bin/python scripts/bench_instr.py --base main~3    # and a ref, side by side
    .venv/bin/python scripts/bench_instr.py --speech         # through a speech = true route

Needs valgrind (Debian: apt-get install valgrind). Takes a few minutes a tree.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import PY, drive, free_port, start_mock, wait_http

ROOT = Path(__file__).resolve().parent.parent


def count(tree: Path, mock_port: int, streams: int, speech: bool) -> int:
    """Instructions of one llmgate process that serves `streams` streams."""
    work = Path(tempfile.mkdtemp(prefix="llmgate-instr-"))
    port = free_port()
    path = "/speech/chat/completions" if speech else "/chat/completions"
    (work / "c.toml").write_text(
        f'[server]\nport = {port}\napi_keys = ["bench"]\n'
        + ("metrics = false\n" if os.environ.get("BENCH_NO_METRICS") else "")
        + '[log]\nlevel = "warning"\n'
        f'[providers.mock]\nbase_url = "http://127.0.0.1:{mock_port}/v1"\n'
        f'[[routes]]\npath = "{path}"\n' + ("speech = true\n" if speech else "")
    )
    out = work / "callgrind.out"
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-line=no"]
    gateway = subprocess.Popen(
        [*valgrind, PY, "-m", "llmgate", "--config", str(work / "c.toml")],
        cwd=tree,  # `-m llmgate` imports the tree's own package
        env={**os.environ, "PYTHONHASHSEED": "0"},  # the same dict layouts every run
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=180)
        url = f"http://127.0.0.1:{port}/v1{path}"
        run = drive(url, {"requests": streams, "concurrency": 1, "chunks": 20, "gap_ms": 20})
        failed = [r for r in run["results"] if "error" in r]
        if failed:
            raise SystemExit(f"bench_instr: {len(failed)} streams failed through {tree}")
    finally:
        gateway.send_signal(signal.SIGINT)
        gateway.wait(timeout=120)
    found = re.search(r"^(?:summary|totals):\s*(\d+)", out.read_text(errors="replace"), re.M)
    shutil.rmtree(work, ignore_errors=True)
    if found is None:
        raise SystemExit("bench_instr: callgrind wrote no totals")
    return int(found.group(1))


def per_stream(tree: Path, mock_port: int, n1: int, n2: int, speech: bool) -> float:
    first = count(tree, mock_port, n1, speech)
    second = count(tree, mock_port, n2, speech)
    return (second - first) / (n2 - n1)


@contextlib.contextmanager
def checkout(ref: str):
    """`ref` in a temporary worktree."""
    where = Path(tempfile.mkdtemp(prefix="llmgate-base-")) / "tree"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(where), ref],
        cwd=ROOT, check=True, capture_output=True,
    )
    try:
        yield where
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=ROOT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", metavar="REF", help="also count a git ref, for a before/after")
    parser.add_argument("--speech", action="store_true", help="through a speech = true route")
    parser.add_argument("--streams", default="20,80", help="N1,N2 (default: %(default)s)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("bench_instr: needs valgrind (apt-get install valgrind)")
    n1, n2 = (int(n) for n in args.streams.split(","))
    mock, mock_port = start_mock()
    results: dict[str, float] = {}
    try:
        if args.base:
            with checkout(args.base) as base:
                results[args.base] = per_stream(base, mock_port, n1, n2, args.speech)
        results["working tree"] = per_stream(ROOT, mock_port, n1, n2, args.speech)
    finally:
        mock.terminate()
        mock.wait(timeout=10)
    for name, value in results.items():
        print(f"{name:>14}: {value:,.0f} instructions a stream")
    if args.base:
        before, after = results[args.base], results["working tree"]
        print(f"{'change':>14}: {after - before:+,.0f} ({(after - before) / before:+.2%})")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
