"""An account per call: one `call` line when a channel goes quiet, memory given back."""

from __future__ import annotations

import gc
import logging
import tracemalloc

import aiohttp

from llmgate.calls import Calls
from llmgate.turn import Turn
from tests.conftest import API_KEY, eventually
from tests.test_cancellation import agora_body
from tests.test_metrics import delta, scrape

HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


def call_lines(caplog) -> list[dict]:
    return [r.turn for r in caplog.records if r.name == "llmgate.call"]


async def test_a_quiet_channel_gets_its_call_line(make_gateway, upstream, caplog):
    caplog.set_level(logging.INFO, logger="llmgate.call")
    gateway = await make_gateway(server={"call_idle_s": 0.3, "metrics": True})
    before = await scrape(gateway)
    url = gateway.make_url("/v1/chat/completions")
    async with aiohttp.ClientSession() as session:
        old = await session.post(url, data=agora_body("stall-mid", 1, "room-1"), headers=HEADERS)
        await old.content.readline()
        for turn, channel in ((2, "room-1"), (3, "room-1"), (1, "room-2")):
            async with session.post(url, data=agora_body("text", turn, channel),
                                    headers=HEADERS) as resp:
                await resp.read()
        await old.read()  # superseded by turn 2
        await eventually(lambda: len(call_lines(caplog)) == 2, timeout=5)
    lines = {line["channel"]: line for line in call_lines(caplog)}
    room = lines["app/room-1"]
    assert (room["turns"], room["superseded"], room["failed"]) == (3, 1, 0)
    assert room["ttft_worst_ms"] >= room["ttft_p50_ms"] > 0
    assert lines["app/room-2"]["turns"] == 1
    assert "hi" not in str(lines) and API_KEY not in str(lines)  # no text, no key
    after = await scrape(gateway)
    assert delta(before, after, "llmgate_calls_total") == 2
    assert delta(before, after, "llmgate_call_duration_seconds_count") == 2


def test_ten_thousand_channels_are_forgotten_once_written_up():
    now = [0.0]
    calls = Calls(idle_s=120, clock=lambda: now[0])

    def turn(i: int) -> Turn:
        t = Turn("/chat/completions")
        t.metadata = {"context": {"appId": "app", "channel": f"room-{i}"}, "turn_id": 1}
        t.first_token = 0.2
        t.usage = {"prompt_tokens": 10, "completion_tokens": 2}
        return t

    logging.getLogger("llmgate.call").disabled = True
    try:
        for i in range(50):  # warm up whatever the first accounts allocate once
            calls.add(turn(i))
        now[0] += 200
        calls.sweep()
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for i in range(10_000):
            calls.add(turn(i))
        held = tracemalloc.get_traced_memory()[0] - base
        assert len(calls) == 10_000
        now[0] += 200
        calls.sweep()
        gc.collect()
        left = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
        logging.getLogger("llmgate.call").disabled = False
    assert len(calls) == 0
    assert held > 1_000_000  # the accounts took room ...
    assert left < held / 20  # ... and gave it back
