"""Replicas sharing limits, circuits and barge-in through a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys

import aiohttp
import pytest

from llmgate.app import LIVE
from llmgate.state import STATE
from tests.conftest import API_KEY, eventually
from tests.redis_server import redis_server  # noqa: F401 (fixture)
from tests.test_cancellation import agora_body
from tests.test_operations import config_text
from tests.test_upstream_failures import free_port
from tests.test_workers import children, fresh

HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
HI = [{"role": "user", "content": "hi"}]


def body(model: str = "text", stream: bool = True) -> dict:
    return {"model": model, "stream": stream, "messages": HI}


@pytest.fixture
def replicas(make_gateway, redis_server):  # noqa: F811
    async def make(n: int = 2, **sections):
        state = {"redis_url": redis_server.url, "timeout_ms": 200, **sections.pop("state", {})}
        made = [await make_gateway(state=state, **sections) for _ in range(n)]
        for gateway in made:
            await eventually(lambda g=gateway: g.app[STATE].shared)
        return made

    return make


async def post(session, gateway, payload: dict) -> tuple[int, bytes]:
    async with session.post(
        gateway.make_url("/v1/chat/completions"), json=payload, headers=HEADERS
    ) as resp:
        return resp.status, await resp.read()


async def test_requests_per_minute_holds_across_replicas(replicas):
    a, b = await replicas(server={"limits": {"requests_per_minute": 5}})
    statuses = []
    async with aiohttp.ClientSession() as session:
        for i in range(10):  # alternately
            status, _ = await post(session, (a, b)[i % 2], body())
            statuses.append(status)
    assert statuses.count(200) == 5 and statuses.count(429) == 5


async def test_max_concurrent_holds_across_replicas(replicas, upstream):
    a, b = await replicas(server={"limits": {"max_concurrent": 2}})
    async with aiohttp.ClientSession() as session:
        held = []
        for gateway in (a, b):  # a stream held open on each replica
            resp = await session.post(
                gateway.make_url("/v1/chat/completions"), json=body("stall-mid"), headers=HEADERS
            )
            assert resp.status == 200
            await resp.content.readline()
            held.append(resp)
        for gateway in (a, b):
            status, raw = await post(session, gateway, body())
            assert status == 429, raw
            assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
        held[0].close()  # a slot comes back when its turn ends: on the other replica too
        await eventually(lambda: upstream.open_streams == 1)
        await asyncio.sleep(0.05)  # (the release is sent in the background)
        status, _ = await post(session, b, body())
        assert status == 200
        held[1].close()


async def test_a_newer_turn_on_another_replica_ends_the_older_one(replicas, upstream, caplog):
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    a, b = await replicas()
    async with aiohttp.ClientSession() as session:
        old = await session.post(
            a.make_url("/v1/chat/completions"), data=agora_body("stall-mid", 4), headers=HEADERS
        )
        await old.content.readline()  # turn 4 streams on A
        async with session.post(
            b.make_url("/v1/chat/completions"), data=agora_body("text", 5), headers=HEADERS
        ) as new:  # turn 5 of the same channel on B
            assert (await new.read()).endswith(b"data: [DONE]\n\n")
        await eventually(lambda: upstream.cancelled == 1)  # A's upstream request closed
        assert b"[DONE]" not in await old.read()
    ends = [(r.turn["status"], r.turn.get("error")) for r in caplog.records
            if r.name == "llmgate.turn"]
    assert (499, "superseded") in ends


async def test_a_late_older_turn_leaves_the_newer_one_alone(replicas, upstream):
    a, b = await replicas()
    async with aiohttp.ClientSession() as session:
        live = await session.post(
            a.make_url("/v1/chat/completions"), data=agora_body("stall-mid", 5), headers=HEADERS
        )
        await live.content.readline()  # turn 5 streams on A
        async with session.post(
            b.make_url("/v1/chat/completions"), data=agora_body("text", 4), headers=HEADERS
        ) as late:  # turn 4, late, on B
            assert (await late.read()).endswith(b"data: [DONE]\n\n")
        async with session.post(
            b.make_url("/v1/chat/completions"), data=agora_body("text", 5), headers=HEADERS
        ) as again:  # turn 5 repeated on B
            assert (await again.read()).endswith(b"data: [DONE]\n\n")
        await asyncio.sleep(0.2)  # what B announced has reached A by now
        assert upstream.cancelled == 0 and upstream.open_streams == 1
        live.close()


async def test_a_circuit_opened_on_one_replica_is_open_on_the_other(replicas, upstream):
    providers = {
        "down": {"base_url": "http://127.0.0.1:9/v1",
                 "breaker": {"failures": 2, "window_s": 30, "cooldown_s": 30}},
        "fake": {"base_url": upstream.url},
    }
    a, b = await replicas(providers=providers, models={"voice": ["down/m", "fake/text"]})
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # two failures on A open the circuit of `down`
            status, _ = await post(session, a, body("voice"))
            assert status == 200  # (the fallback served them)
        health_b = b.app[LIVE].current.router.health["down"]
        await eventually(lambda: health_b.state == "open")
        assert not health_b.usable()


async def test_redis_down_serves_locally_and_shares_again(replicas, redis_server, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="llmgate.state")
    a, b = await replicas(server={"limits": {"requests_per_minute": 3}})
    async with aiohttp.ClientSession() as session:
        stream = await session.post(
            a.make_url("/v1/chat/completions"), json=body("slow-words"), headers=HEADERS
        )
        redis_server.stop()  # mid-stream
        assert (await stream.read()).endswith(b"data: [DONE]\n\n")  # it finishes normally
        status, _ = await post(session, a, body())
        assert status == 200  # a new request is served
        await eventually(lambda: not a.app[STATE].shared)
        async with session.get(a.make_url("/healthz")) as resp:
            assert resp.status == 200 and (await resp.json())["state"] == "local"
        down = [r for r in caplog.records if "own until it is back" in r.getMessage()]
        assert len(down) == 1
        redis_server.start()
        await eventually(lambda: a.app[STATE].shared and b.app[STATE].shared, timeout=10)
        back = [r for r in caplog.records if "shared again" in r.getMessage()]
        assert len([r for r in back if r.getMessage()]) >= 1
        async with session.get(a.make_url("/healthz")) as resp:
            assert (await resp.json())["state"] == "shared"
        # a limit holds across both replicas again
        statuses = [(await post(session, (a, b)[i % 2], body()))[0] for i in range(6)]
        assert statuses.count(200) == 3


def state_extra(redis_url: str, limits: str, lease_s: int = 30) -> str:
    return (f"[server.limits]\n{limits}\n"
            f'[state]\nredis_url = "{redis_url}"\nlease_s = {lease_s}\n')


async def test_a_limit_holds_across_two_workers(tmp_path, upstream, redis_server):  # noqa: F811
    port = free_port()
    config = tmp_path / "c.toml"
    config.write_text(config_text(port, upstream.url,
                                  state_extra(redis_server.url, "requests_per_minute = 4")))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmgate", "--config", str(config), "--workers", "2",
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await eventually(lambda: len(children(proc.pid)) == 2, timeout=20)
        await _both_shared(url)
        statuses = [await fresh(url) for _ in range(8)]  # each on a connection of its own
        assert statuses.count(200) == 4 and statuses.count(429) == 4, statuses
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()


async def _both_shared(url: str) -> None:
    """Every worker has reached Redis (each answers /healthz on connections of its own)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        seen = 0
        for _ in range(500):
            try:
                async with session.get(url + "/healthz") as resp:
                    state = (await resp.json()).get("state")
                seen = seen + 1 if state == "shared" else 0
                if seen >= 20:
                    return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.02)
    raise AssertionError("the workers did not reach Redis")


async def test_a_killed_replicas_slots_come_back_within_the_lease(
    tmp_path, upstream, redis_server, replicas  # noqa: F811
):
    port = free_port()
    config = tmp_path / "c.toml"
    config.write_text(config_text(
        port, upstream.url, state_extra(redis_server.url, "max_concurrent = 2", lease_s=2)
    ))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmgate", "--config", str(config),
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    b, = await replicas(1, server={"limits": {"max_concurrent": 2}}, state={"lease_s": 2})
    async with aiohttp.ClientSession() as session:
        try:
            await _both_shared(url)
            held = []
            for _ in range(2):  # both of the key's slots, held by the child
                resp = await session.post(url + "/v1/chat/completions", json=body("stall-mid"),
                                          headers=HEADERS)
                assert resp.status == 200
                await resp.content.readline()
                held.append(resp)
            assert (await post(session, b, body()))[0] == 429
            await asyncio.sleep(3)  # past lease_s: a living holder keeps its slots
            assert (await post(session, b, body()))[0] == 429
        finally:
            proc.kill()  # SIGKILL: no turn end gives its slot back
            await proc.wait()
        loop = asyncio.get_running_loop()
        killed = loop.time()
        while (await post(session, b, body()))[0] == 429:
            assert loop.time() - killed < 2 + 1.5, "the slots did not come back"
            await asyncio.sleep(0.1)
        for resp in held:
            resp.close()


def test_a_redis_url_is_checked_and_its_password_never_shown(caplog):
    from llmgate.config import ConfigError, parse
    from llmgate.state.redis import where

    raw = {"providers": {"p": {"base_url": "http://x/v1"}},
           "state": {"redis_url": "http://user:hunter2@cache:6379"}}
    with pytest.raises(ConfigError) as info:
        parse(raw, {})
    assert str(info.value).startswith("state.redis_url:") and "hunter2" not in str(info.value)
    assert where("rediss://:hunter2@cache.internal:6380/2") == "rediss://cache.internal:6380/2"


async def test_a_half_open_circuit_probes_once_across_replicas(replicas):
    a, b = await replicas()
    boards = [g.app[STATE].board for g in (a, b)]
    claims = await asyncio.gather(*(board.claim_probe("fake", 5.0) for board in boards))
    assert sorted(claims) == [False, True]
    health = b.app[LIVE].current.router.health["fake"]
    health.state = "half_open"
    assert not await health.begin()  # A holds the probe: B may not probe


async def test_a_password_in_the_url_works_and_is_never_logged(
    make_gateway, tmp_path, caplog
):
    from tests.redis_server import RedisServer

    caplog.set_level(logging.INFO, logger="llmgate.state")
    server = RedisServer(tmp_path, password="s3cret-pw")
    server.start()
    try:
        gateway = await make_gateway(state={"redis_url": server.url},
                                     server={"limits": {"requests_per_minute": 2}})
        await eventually(lambda: gateway.app[STATE].shared)
        async with aiohttp.ClientSession() as session:
            statuses = [(await post(session, gateway, body()))[0] for _ in range(3)]
        assert statuses == [200, 200, 429]
        assert "s3cret-pw" not in caplog.text and "shared through Redis" in caplog.text
    finally:
        server.stop()


def test_a_long_channel_name_is_bounded_and_still_its_own():
    from llmgate.agora import MAX_CHANNEL_KEY, channel_key

    one = channel_key({"context": {"appId": "a", "channel": "x" * 100_000}})
    two = channel_key({"context": {"appId": "a", "channel": "x" * 99_999 + "y"}})
    assert len(one) == len(two) == MAX_CHANNEL_KEY and one != two


async def test_a_lost_admission_reply_gives_its_slot_back(replicas, redis_server):  # noqa: F811
    """Redis ran the script but its reply never came (the caller left, or Redis was slow):
    the slot it took is given back, not held for lease_s."""
    (a,) = await replicas(1, server={"limits": {"max_concurrent": 1}})
    state = a.app[STATE]
    real = state.call

    async def lost(make):
        await real(make)  # the script runs ...
        raise asyncio.CancelledError  # ... and the caller leaves before its reply

    state.call = lost
    async with aiohttp.ClientSession() as session:
        with contextlib.suppress(aiohttp.ClientError):  # (its turn ended with the cancel)
            resp = await session.post(a.make_url("/v1/chat/completions"), json=body(),
                                      headers=HEADERS)
            resp.close()
        state.call = real
        await asyncio.sleep(0.1)  # (the slot goes back within RELEASE_S)
        status, raw = await post(session, a, body())
        assert status == 200, raw


async def test_an_abandoned_probe_frees_the_claim_for_the_others(replicas):
    a, b = await replicas()
    board_a, board_b = (g.app[STATE].board for g in (a, b))
    assert await board_a.claim_probe("fake", 30.0)
    assert not await board_b.claim_probe("fake", 30.0)
    board_a.abandoned("fake")  # its caller left: no verdict
    await asyncio.sleep(0.1)
    assert await board_b.claim_probe("fake", 30.0)


async def test_check_probes_redis_and_never_shows_its_password(tmp_path, capsys, upstream):
    from tests.redis_server import RedisServer
    from tests.test_check import check, row, write

    server = RedisServer(tmp_path, password="s3cret-pw")
    server.start()
    try:
        text = (f'[providers.fake]\nbase_url = "{upstream.url}"\n'
                f'[state]\nredis_url = "{server.url}"\n')
        code, out = await check(capsys, write(tmp_path, text))
        status, detail = row(out, "state redis")
        assert status == "ok" and "PING and scripts ok" in detail
        server.stop()
        code, out = await check(capsys, write(tmp_path, text))
        assert code == 1 and row(out, "state redis")[0] == "FAIL"
        assert "s3cret-pw" not in out and f"127.0.0.1:{server.port}" in out
    finally:
        server.stop()
