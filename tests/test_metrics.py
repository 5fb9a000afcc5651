"""GET /metrics: what a known sequence of turns adds up to, and who may read it."""

from __future__ import annotations

import asyncio
from unittest import mock

import aiohttp
import openai
import pytest
from aiohttp.test_utils import make_mocked_request
from prometheus_client.parser import text_string_to_metric_families

from llmgate.server.handlers import MetricsPage
from tests.conftest import API_KEY, eventually
from tests.test_rag import kb_path  # noqa: F401 (fixture)
from tests.test_resilience import backup, providers, streamed  # noqa: F401 (fixture)
from tests.test_tools import CITY, service  # noqa: F401 (fixture)

HI = [{"role": "user", "content": "hi"}]


async def scrape(gateway, key: str | None = None) -> dict[tuple, float]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = gateway.make_url("/metrics")
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.fixture
async def gateway(make_gateway, upstream, backup):  # noqa: F811
    return await make_gateway(
        providers=providers(upstream, backup, {"models": ["text", "stall-mid"]}, None),
        models={"voice": ["fake/status-503", "backup/text"]},
        tools={"weather": {"kind": "http", "url": "http://127.0.0.1:9/w"}},
    )


async def test_metrics_after_a_known_sequence(gateway, connect, upstream):
    client = connect(gateway)
    before = await scrape(gateway)
    assert await streamed(client, "voice") == ("Hello there, h\u00e9llo \U0001f44b!", "stop")
    await client.chat.completions.create(model="fake/text", messages=HI)  # usage: 9 + 3
    await streamed(client, "fake/markdown")  # a model config.toml does not name: "other"
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="text", messages=[])
    # A hang-up: 499.
    body = {"model": "fake/stall-mid", "messages": HI, "stream": True}
    async with aiohttp.ClientSession() as session:
        url = gateway.make_url("/v1/chat/completions")
        resp = await session.post(url, json=body, headers={"Authorization": f"Bearer {API_KEY}"})
        await resp.content.readline()
        during = await scrape(gateway)
        assert delta(before, during, "llmgate_active_streams") == 1
        resp.close()
    await eventually(lambda: upstream.open_streams == 0)
    await asyncio.sleep(0.05)
    after = await scrape(gateway)
    route = "/chat/completions"
    requests = "llmgate_requests_total"
    assert delta(before, after, requests, route=route, model="text", provider="backup",
                 status="200") == 1
    assert delta(before, after, requests, route=route, model="text", provider="fake",
                 status="200") == 1
    assert delta(before, after, requests, route=route, model="other", provider="none",
                 status="400") == 1
    assert delta(before, after, requests, route=route, model="other", provider="fake",
                 status="200") == 1
    assert delta(before, after, requests, route=route, model="stall-mid", provider="fake",
                 status="499") == 1
    assert delta(before, after, "llmgate_fallbacks_total", alias="voice") == 1
    assert delta(before, after, "llmgate_upstream_failures_total", provider="fake",
                 error="upstream_error") == 1
    assert delta(before, after, "llmgate_tokens_total", provider="fake", kind="prompt") == 9
    assert delta(before, after, "llmgate_tokens_total", provider="fake", kind="completion") == 3
    assert delta(before, after, "llmgate_active_streams") == 0
    ttft = "llmgate_time_to_first_token_seconds_count"
    assert delta(before, after, ttft, route=route, provider="backup") == 1
    assert delta(before, after, "llmgate_upstream_first_token_seconds_count",
                 provider="backup") == 1
    assert delta(before, after, "llmgate_overhead_seconds_count", route=route) >= 2
    # No label holds a request id or a caller's own text.
    assert not any("req_" in str(labels) for _, labels in after)


async def test_a_circuit_state_is_a_gauge(make_gateway, upstream, backup, connect):  # noqa: F811
    breaker = {"breaker": {"failures": 1, "window_s": 30, "cooldown_s": 60}}
    gw = await make_gateway(
        providers=providers(upstream, backup, breaker, None),
        models={"voice": ["fake/text", "backup/text"]},
    )
    upstream.fail_with = 503
    await streamed(connect(gw), "voice")
    after = await scrape(gw)
    assert after[("llmgate_circuit_state", (("provider", "fake"),))] == 2


async def test_a_metrics_key_is_asked_for_when_set(make_gateway):
    gw = await make_gateway(server={"metrics_key": "scrape-me"})
    async with aiohttp.ClientSession() as session, session.get(gw.make_url("/metrics")) as resp:
        assert resp.status == 401
    assert await scrape(gw, "scrape-me")


async def test_without_a_key_only_loopback_may_read():
    page = MetricsPage(None)
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        ("10.1.2.3", 5555) if name == "peername" else default
    )
    request = make_mocked_request("GET", "/metrics", transport=transport)
    with pytest.raises(Exception) as info:
        await page.handle(request)
    assert getattr(info.value, "status", None) == 403


async def test_metrics_off(make_gateway):
    gw = await make_gateway(server={"metrics": False})
    async with aiohttp.ClientSession() as session, session.get(gw.make_url("/metrics")) as resp:
        assert resp.status == 404


async def test_through_a_proxy_on_this_host_metrics_need_the_key(make_gateway):
    gw = await make_gateway()
    headers = {"X-Forwarded-For": "203.0.113.9"}  # from 127.0.0.1, but not a local caller's
    url = gw.make_url("/metrics")
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        assert resp.status == 403


async def test_process_build_and_reload_metrics_no_created_twins(gateway, upstream):
    from llmgate.app import reload
    from llmgate.config import parse
    from tests.conftest import gateway_config

    async with (
        aiohttp.ClientSession() as session,
        session.get(gateway.make_url("/metrics")) as resp,
    ):
        text = await resp.text()
    assert "_created" not in text  # no twin of every counter
    before = await scrape(gateway)
    names = {name for name, _ in before}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= names
    build = [labels for name, labels in before if name == "llmgate_build_info"]
    assert build and dict(build[0])["version"]
    assert before[("llmgate_config_last_reload_success_timestamp_seconds", ())] > 0
    await reload(gateway.app, parse(gateway_config(upstream.url), {}))
    from llmgate.obs import metrics

    metrics.reloaded(True)  # what the SIGHUP handler says once a reload took
    after = await scrape(gateway)
    assert delta(before, after, "llmgate_config_reloads_total", outcome="ok") == 1


async def test_model_first_token_apart_from_a_waiting_phrase(make_gateway, connect, upstream):
    gateway = await make_gateway(
        routes=[{"path": "/chat/completions"}, {"path": "/speech/chat/completions", "speech": True}]
    )
    before = await scrape(gateway)
    client = connect(gateway).with_options(base_url=str(gateway.make_url("/v1/speech")))
    await streamed(client, "slow-first")  # the provider's first token 300 ms after its 200
    after = await scrape(gateway)
    key = ("provider", "fake"), ("route", "/speech/chat/completions")
    count = "llmgate_time_to_model_first_token_seconds_count"
    assert after.get((count, key), 0) - before.get((count, key), 0) == 1
    total = "llmgate_time_to_model_first_token_seconds_sum"
    assert after[(total, key)] - before.get((total, key), 0) >= 0.3


def test_an_mcp_call_is_counted_under_its_server_section():
    from llmgate.obs import metrics
    from llmgate.turn import ToolCallNote, ToolsNote, Turn

    turn = Turn("/tools/chat/completions")
    turn.noted().tools = ToolsNote(calls=[
        # an MCP server's tool
        ToolCallNote(name="lookup_customer", round=1, server="crm", ok=True),
        ToolCallNote(name="weather", round=1, ok=False),  # an HTTP tool: its section is its name
    ])
    names = metrics.Names(set(), {"crm", "weather"})
    sample = metrics.TOOL_CALLS.labels("crm", "ok")._value.get()
    other = metrics.TOOL_CALLS.labels("other", "ok")._value.get()
    metrics.observe(turn, names)
    assert metrics.TOOL_CALLS.labels("crm", "ok")._value.get() == sample + 1
    assert metrics.TOOL_CALLS.labels("other", "ok")._value.get() == other


async def test_every_stage_metric_is_read_from_its_turn(
    make_gateway, upstream, connect, kb_path, service, tmp_path  # noqa: F811
):
    """Retrieval time, tool calls and first audio are read from the turn's typed notes:
    one turn on each stage's route moves each one (a note renamed or left unset fails)."""
    (tmp_path / "hi.pcm").write_bytes(b"\0\1" * 8000)
    (tmp_path / "hi.txt").write_text("Hello.\n")
    gateway = await make_gateway(
        kb={"shop": {"path": str(kb_path)}},
        rag={"shop": {"kb": "shop"}},
        tools={"weather": {"kind": "http", "url": service.url + "weather",
                           "parameters": CITY}},
        audio={"hi": {"engine": "file", "pcm_file": str(tmp_path / "hi.pcm"),
                      "text_file": str(tmp_path / "hi.txt"), "pace": False}},
        routes=[
            {"path": "/rag/chat/completions", "rag": "shop"},
            {"path": "/tools/chat/completions", "tools": ["weather"]},
            {"path": "/audio/chat/completions", "audio": "hi"},
        ],
    )
    before = await scrape(gateway)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    messages = [{"role": "user", "content": "Do you ship to Canada?"}]
    async with aiohttp.ClientSession() as session:
        for path, model in [("/rag", "text"), ("/tools", "use-tools-weather"), ("/audio", "text")]:
            body = {"model": model, "stream": True, "messages": messages}
            async with session.post(
                gateway.make_url(path + "/chat/completions"), json=body, headers=headers
            ) as resp:
                assert resp.status == 200
                assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    after = await scrape(gateway)
    assert delta(before, after, "llmgate_retrieval_seconds_count",
                 route="/rag/chat/completions") == 1
    assert delta(before, after, "llmgate_tool_calls_total", tool="weather", outcome="ok") == 1
    assert delta(before, after, "llmgate_time_to_first_audio_seconds_count", engine="file") == 1
