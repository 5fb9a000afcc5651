"""What sharing state through Redis costs, and how fast a barge-in crosses replicas.

    state      the plain route at c1, llmgate without [state] and with it (a key limit set,
               so every turn's admission is one script on Redis), alternately, same run:
               first token added over the mock upstream and CPU per stream, each
    replicas   two llmgate processes sharing one Redis, c50 split over both: requests per
               second and failures; then cross-replica barge-ins: turn N streams on A,
               turn N+1 of that channel is sent to B, timed from sending it to A's answer
               ending (A's upstream request closed first)

    .venv/bin/python scripts/bench_replicas.py [--quick] [--json PATH]

Needs redis-server (Debian: apt-get install redis-server); starts it on a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from bench import PY, Proc, drive, free_port, pct, start_mock, summarize, wait_http

HERE = Path(__file__).resolve().parent


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("bench_replicas: redis-server is not installed "
                         "(Debian: apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    for _ in range(500):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.02)
    raise SystemExit("bench_replicas: redis-server did not start")


def start_llmgate(
    workdir: Path, name: str, mock_port: int, state: str
) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = workdir / f"{name}.toml"
    config.write_text(
        f"[server]\nport = {port}\n{state}\n"
        f'[providers.mock]\nbase_url = "http://127.0.0.1:{mock_port}/v1"\n'
        '[[routes]]\npath = "/chat/completions"\n'
    )
    log = open(workdir / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([PY, "-m", "llmgate", "--config", str(config)], stderr=log,
                            cwd=HERE.parent)
    wait_http(f"http://127.0.0.1:{port}/healthz")
    return proc, port


def shared(redis_url: str) -> str:
    # a limit no turn reaches, so that every admission is the script's round trip
    return (f'[server.limits]\nrequests_per_minute = 100000000\nmax_concurrent = 1000000\n'
            f'[state]\nredis_url = "{redis_url}"\n')


def c1(port: int, requests: int) -> dict:
    return summarize(drive(f"http://127.0.0.1:{port}/v1/chat/completions",
                           {"requests": requests, "concurrency": 1, "chunks": 20, "warmup": 20}))


def state_scenario(workdir: Path, mock_port: int, redis_url: str, requests: int) -> dict:
    direct = c1(mock_port, requests)
    out: dict[str, dict] = {}
    procs = {name: start_llmgate(workdir, name, mock_port, extra)
             for name, extra in (("local", ""), ("redis", shared(redis_url)))}
    try:
        runs: dict[str, list[tuple[float, float]]] = {"local": [], "redis": []}
        for _ in range(2):  # alternately, so that a noisy minute hits both
            for name, (proc, port) in procs.items():
                gw = Proc(proc.pid)
                cpu0 = gw.cpu_s()
                result = c1(port, requests)
                cpu = (gw.cpu_s() - cpu0) * 1000 / max(1, requests + 20)
                runs[name].append((result["ttft_p50_ms"] or 0.0, cpu))
        base = direct["ttft_p50_ms"] or 0.0
        for name, values in runs.items():
            out[name] = {
                "added_ttft_p50_ms": round(statistics.median(v[0] for v in values) - base, 3),
                "cpu_ms_per_stream": round(statistics.median(v[1] for v in values), 3),
            }
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait()
    return out


async def barge_ins(a: int, b: int, count: int) -> list[float]:
    """Turn 2k streams on A (a slow answer); turn 2k+1 of its channel goes to B; the time
    from sending it until A's answer ends."""
    times = []
    async with aiohttp.ClientSession() as session:
        for k in range(count):
            channel = f"bench-{k}"

            def body(turn: int, model: str, channel: str = channel) -> dict:
                message = {"role": "user", "content": "hi", "turn_id": turn, "timestamp": 1}
                return {"model": model, "stream": True, "messages": [message],
                        "context": {"appId": "bench", "channel": channel}}

            old = await session.post(f"http://127.0.0.1:{a}/v1/chat/completions",
                                     json=body(1, "mock-2000-0-20"))
            await old.content.readline()  # A's answer has begun
            started = time.monotonic()
            async with session.post(f"http://127.0.0.1:{b}/v1/chat/completions",
                                    json=body(2, "mock-5-0-0")) as new:
                ended = asyncio.ensure_future(old.read())
                await new.read()
                await asyncio.wait_for(ended, 10)
            times.append((time.monotonic() - started) * 1000)
            old.close()
    return times


def replicas_scenario(workdir: Path, mock_port: int, redis_url: str, quick: bool) -> dict:
    state = f'[state]\nredis_url = "{redis_url}"\n'
    (pa, a), (pb, b) = (start_llmgate(workdir, n, mock_port, state) for n in ("a", "b"))
    try:
        requests = 400 if quick else 4000
        options = {"requests": requests // 2, "concurrency": 25, "chunks": 20, "warmup": 2}
        started = time.monotonic()
        with tempfile.TemporaryDirectory():
            drivers = [
                subprocess.Popen(
                    [PY, str(HERE / "bench_load.py"), "--url",
                     f"http://127.0.0.1:{port}/v1/chat/completions",
                     *[x for k, v in options.items() for x in (f"--{k}", str(v))]],
                    stdout=subprocess.PIPE, text=True,
                )
                for port in (a, b)
            ]
            results = [summarize(json.loads(d.communicate()[0])) for d in drivers]
        elapsed = time.monotonic() - started
        failed = sum(r["failed"] for r in results)
        times = asyncio.run(barge_ins(a, b, 20 if quick else 200))
    finally:
        for proc in (pa, pb):
            proc.terminate()
            proc.wait()
    return {
        "c50_rps": round(requests / elapsed, 1),
        "c50_failed": failed,
        "barge_in_ms_p50": pct(times, 0.5),
        "barge_in_ms_p99": pct(times, 0.99),
        "barge_ins": len(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="llmgate-replicas-"))
    redis, redis_url = start_redis(workdir)
    mock, mock_port = start_mock()
    try:
        report = {
            "state": state_scenario(workdir, mock_port, redis_url, 100 if args.quick else 1000),
            "replicas": replicas_scenario(workdir, mock_port, redis_url, args.quick),
        }
    finally:
        mock.terminate()
        redis.terminate()
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
