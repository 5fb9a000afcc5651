"""How long a hostile caller can stall llmgate's loop: the largest gap in a paced stream, and
the slowest /healthz, while callers without a key send gzip bombs (1 MB that inflates to
1,000 MB) to a route and to a path that does not exist.

    .venv/bin/python scripts/bench_stall.py                 # the working tree
    .venv/bin/python scripts/bench_stall.py --base main~3   # and a ref, side by side

A stream of 150 chunks 20 ms apart runs twice through llmgate, quiet and under attack; the
gaps a reader sees are the mock's 20 ms plus whatever llmgate's loop was busy with. Judged
loosely (a shared VM moves a few ms): a loop that inflates a bomb shows gaps of 500 ms+.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import subprocess
import sys
import time
import zlib
from pathlib import Path

import aiohttp
from bench import PY, free_port, start_mock, wait_http
from bench_instr import ROOT, checkout


def gzip_bomb(inflated_mb: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip wrapper
    block = b"\0" * 2**20
    return b"".join(packer.compress(block) for _ in range(inflated_mb)) + packer.flush()


def start_gateway(tree: Path, mock_port: int, work: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = work / "stall.toml"
    config.write_text(
        f'[server]\nport = {port}\napi_keys = ["bench"]\n[log]\nlevel = "warning"\n'
        f'[providers.mock]\nbase_url = "http://127.0.0.1:{mock_port}/v1"\n'
    )
    proc = subprocess.Popen(
        [PY, "-m", "llmgate", "--config", str(config)], cwd=tree, stderr=subprocess.DEVNULL
    )
    wait_http(f"http://127.0.0.1:{port}/healthz")
    return proc, port


async def paced_stream(port: int) -> list[float]:
    """Gaps (ms) between the reads of one 150-chunk stream, 20 ms apart at the source."""
    messages = [{"role": "user", "content": "x"}]
    body = {"model": "mock-150-0-20", "stream": True, "messages": messages}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    seen: list[float] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers={"Authorization": "Bearer bench"}) as resp,
    ):
        async for _ in resp.content.iter_any():
            seen.append(time.perf_counter())
    return [(b - a) * 1000 for a, b in itertools.pairwise(seen)]


async def health_probes(port: int, stop: asyncio.Event) -> list[float]:
    """/healthz latencies (ms), one every 100 ms until `stop`."""
    out: list[float] = []
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            started = time.perf_counter()
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                await resp.read()
            out.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.1)
    return out


async def attacker(port: int, bomb: bytes, path: str, stop: asyncio.Event) -> int:
    """Sends the bomb without a key until `stop`; returns how many were sent."""
    sent = 0
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(bomb)}\r\n\r\n".encode()
            )
            writer.write(bomb)
            await writer.drain()
            await asyncio.wait_for(reader.read(4096), 10)
            writer.close()
            sent += 1
        except (OSError, TimeoutError):
            await asyncio.sleep(0.05)
    return sent


async def measure(port: int, bomb: bytes | None, attackers: int) -> dict:
    stop = asyncio.Event()
    probes = asyncio.create_task(health_probes(port, stop))
    attacks = [
        asyncio.create_task(attacker(port, bomb, path, stop))
        for i in range(attackers if bomb else 0)
        for path in (("/no/such/path", "/v1/chat/completions")[i % 2],)
    ]
    await asyncio.sleep(0.3 if bomb else 0)
    gaps = await paced_stream(port)
    stop.set()
    health = await probes
    sent = sum(await asyncio.gather(*attacks))
    gaps.sort()
    return {
        "max_gap_ms": round(gaps[-1], 1),
        "p99_gap_ms": round(gaps[int(len(gaps) * 0.99)], 1),
        "healthz_max_ms": round(max(health), 1),
        "bombs_sent": sent,
    }


def run_tree(tree: Path, mock_port: int, bomb: bytes, attackers: int) -> dict:
    work = Path(subprocess.check_output(["mktemp", "-d"], text=True).strip())
    gateway, port = start_gateway(tree, mock_port, work)
    try:
        quiet = asyncio.run(measure(port, None, 0))
        attacked = asyncio.run(measure(port, bomb, attackers))
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
    return {"quiet": quiet, "attack": attacked}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", metavar="REF", help="also measure a git ref")
    parser.add_argument("--attackers", type=int, default=4)
    parser.add_argument("--inflated-mb", type=int, default=1000)
    args = parser.parse_args()
    bomb = gzip_bomb(args.inflated_mb)
    print(f"bomb: {len(bomb) / 2**20:.1f} MB inflating to {args.inflated_mb} MB", flush=True)
    mock, mock_port = start_mock()
    results: dict[str, dict] = {}
    try:
        if args.base:
            with checkout(args.base) as base:
                results[args.base] = run_tree(base, mock_port, bomb, args.attackers)
        results["working tree"] = run_tree(ROOT, mock_port, bomb, args.attackers)
    finally:
        mock.terminate()
        mock.wait(timeout=10)
    for name, runs in results.items():
        for when, values in runs.items():
            shown = "  ".join(f"{k}={v}" for k, v in values.items())
            print(f"{name:>14} {when:>6}: {shown}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
