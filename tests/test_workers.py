"""`--workers 2`: two processes on one port, serving, reloading, restarted, drained."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import API_KEY, eventually, stream_chunks
from tests.test_operations import HEADERS, HI, _post, config_text
from tests.test_upstream_failures import free_port


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan waits for whoever reaps it here)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def fresh(url: str, path: str = "/v1/chat/completions", model: str = "text") -> int:
    """One request on a connection of its own (the kernel picks a worker per connection)."""
    body = {"model": model, "messages": HI}
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(url + path, json=body, headers=HEADERS) as resp,
    ):
        await resp.read()
        return resp.status


async def requests_total(url: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        text = await resp.text()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "llmgate_requests_total"
    )


async def test_two_workers_serve_reload_restart_and_drain(tmp_path, upstream):
    port = free_port()
    config = tmp_path / "c.toml"
    config.write_text(config_text(port, upstream.url, "drain_s = 10"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmgate", "--config", str(config), "--workers", "2",
        stderr=asyncio.subprocess.PIPE, env={**os.environ},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await eventually(lambda: len(children(proc.pid)) == 2, timeout=20)
        workers = children(proc.pid)
        for _ in range(500):
            try:
                if await fresh(url) == 200:
                    break
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # both workers listening
        before = {w: cpu_ticks(w) for w in workers}
        total = await requests_total(url)
        statuses = await asyncio.gather(*(fresh(url) for _ in range(60)))
        assert statuses == [200] * 60
        # Counted once each, whichever worker served it or the scrape.
        assert await requests_total(url) - total == 60
        assert all(cpu_ticks(w) > before[w] for w in workers)  # both took connections

        # SIGHUP: the supervisor checks the file, every worker reloads it.
        speech = '[[routes]]\npath = "/speech/chat/completions"\nspeech = true\n'
        config.write_text(config_text(port, upstream.url, "drain_s = 10", speech))
        proc.send_signal(signal.SIGHUP)

        async def all_have_it() -> bool:
            got = await asyncio.gather(
                *(fresh(url, "/v1/speech/chat/completions") for _ in range(20))
            )
            return got == [200] * 20

        for _ in range(100):
            if await all_have_it():
                break
            await asyncio.sleep(0.1)
        assert await all_have_it()

        # A worker that dies is started again.
        os.kill(workers[0], signal.SIGKILL)
        await eventually(
            lambda: len(children(proc.pid)) == 2 and workers[0] not in children(proc.pid),
            timeout=20,
        )

        # SIGTERM: a stream in flight finishes, then everything exits 0.
        async with aiohttp.ClientSession() as session:
            resp = await _post(session, url, "slow-words")
            await resp.content.readline()
            proc.send_signal(signal.SIGTERM)
            chunks = stream_chunks((await resp.read()).lstrip(b"\n"))
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
        assert "supervising 2 workers" in err and "Traceback" not in err
        assert API_KEY not in err
    finally:
        if proc.returncode is None:
            for pid in children(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            await proc.wait()


async def test_a_killed_supervisors_metrics_folder_is_removed_by_the_next(tmp_path, upstream):
    port = free_port()
    config = tmp_path / "c.toml"
    config.write_text(config_text(port, upstream.url, "drain_s = 1"))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["TMPDIR"] = str(tmp)

    async def supervisor() -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llmgate", "--config", str(config), "--workers", "2",
            stderr=asyncio.subprocess.DEVNULL, env=env,
        )
        await eventually(lambda: len(children(proc.pid)) == 2, timeout=20)
        return proc

    first = await supervisor()
    workers = children(first.pid)
    first.kill()  # SIGKILL: no clean-up of its own
    await first.wait()
    await eventually(lambda: not any(running(w) for w in workers), timeout=20)
    left = [p.name for p in tmp.iterdir()]
    assert left == [f"llmgate-metrics-{first.pid}-" + left[0].rsplit("-", 1)[1]]
    second = await supervisor()
    try:
        await eventually(lambda: all(str(first.pid) not in p.name for p in tmp.iterdir()))
        assert [p.name.split("-")[2] for p in tmp.iterdir()] == [str(second.pid)]
    finally:
        second.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.wait(), 20) == 0
    assert list(tmp.iterdir()) == []
