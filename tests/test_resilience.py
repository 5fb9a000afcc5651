"""Aliases, fallback and hedging before the first token, the circuit breaker, the apology."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from llmgate.app import create_app
from llmgate.config import BreakerConfig, parse
from llmgate.errors import UpstreamStatus, UpstreamUnavailable
from tests.conftest import API_KEY, eventually, gateway_config
from tests.fake_upstream import WORDS, FakeUpstream
from tests.test_upstream_failures import free_port

HI = [{"role": "user", "content": "hi"}]
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
TEXT = "".join(WORDS)


@pytest.fixture
async def backup(aiohttp_server) -> FakeUpstream:
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app)
    fake.url = str(server.make_url("/v1"))  # type: ignore[attr-defined]
    return fake


def providers(upstream, backup, fake: Any, second: Any) -> dict[str, Any]:
    timeouts = {"first_token_timeout_s": 0.5, "idle_timeout_s": 0.5}
    return {
        "fake": {"base_url": upstream.url, "api_key": "k1", **timeouts, **(fake or {})},
        "backup": {"base_url": backup.url, "api_key": "k2", **timeouts, **(second or {})},
    }


@pytest.fixture
def resilient(aiohttp_server, upstream, backup, connect):
    """A gateway with aliases over two fake providers, and an openai client for it."""

    async def make(models: dict[str, Any], env=None, fake=None, second=None, **sections: Any):
        raw = {
            "server": {"api_keys": [API_KEY], **sections.pop("server", {})},
            "providers": providers(upstream, backup, fake, second),
            "models": models,
            **sections,
        }
        gateway = await aiohttp_server(create_app(parse(copy.deepcopy(raw), env or {})))
        return connect(gateway)

    return make


async def streamed(client, model: str, **kw: Any) -> tuple[str, str | None]:
    stream = await client.chat.completions.create(model=model, messages=HI, stream=True, **kw)
    text, finish = "", None
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


def turns(caplog) -> list[dict]:
    return [r.turn for r in caplog.records if r.name == "llmgate.turn"]


FAILURES = ["status-503", "status-500", "status-429", "reset-at-once", "stall", "html"]


@pytest.mark.parametrize("model", FAILURES)
@pytest.mark.parametrize("stream", [True, False])
async def test_fallback_before_the_first_token(resilient, upstream, backup, caplog, model, stream):
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    client = await resilient({"voice": [f"fake/{model}", "backup/text"]})
    if stream:
        text, finish = await streamed(client, "voice", temperature=0.3, seed=7)
    else:
        answer = await client.chat.completions.create(
            model="voice", messages=HI, temperature=0.3, seed=7
        )
        text, finish = answer.choices[0].message.content, answer.choices[0].finish_reason
    assert (text, finish) == (TEXT, "stop")
    assert [r["model"] for r in upstream.requests] == [model]
    # The next target gets the caller's body as it came, with its own model.
    (sent,) = backup.requests
    assert sent["model"] == "text" and sent["temperature"] == 0.3 and sent["seed"] == 7
    assert sent["messages"] == HI
    (turn,) = turns(caplog)
    assert (turn["status"], turn["provider"], turn["model"]) == (200, "backup", "text")
    attempts = turn["upstream"]["attempts"]
    assert [a["target"] for a in attempts] == [f"fake/{model}", "backup/text"]
    assert "error" in attempts[0] and "error" not in attempts[1]


async def test_fallback_from_a_refused_connection_and_an_unset_variable(
    resilient, aiohttp_server, backup, upstream, connect
):
    raw = {
        "server": {"api_keys": [API_KEY]},
        "providers": {
            "down": {"base_url": f"http://127.0.0.1:{free_port()}/v1"},
            "unset": {"base_url": upstream.url, "api_key": "${NOT_SET_ANYWHERE}"},
            "backup": {"base_url": backup.url},
        },
        "models": {"voice": ["down/text", "unset/text", "backup/text"]},
    }
    client = connect(await aiohttp_server(create_app(parse(raw, {}))))
    assert await streamed(client, "voice") == (TEXT, "stop")
    assert upstream.requests == [] and len(backup.requests) == 1


@pytest.mark.parametrize("model", ["stall-mid", "error-mid", "truncated", "garbage"])
async def test_no_fallback_after_the_first_token(resilient, backup, model):
    client = await resilient({"voice": [f"fake/{model}", "backup/text"]})
    with pytest.raises(openai.APIError):
        await streamed(client, "voice")
    assert backup.requests == []


async def test_a_callers_mistake_does_not_fall_back(resilient, backup):
    client = await resilient({"voice": ["fake/status-400", "backup/text"]})
    with pytest.raises(openai.BadRequestError) as info:
        await streamed(client, "voice")
    assert info.value.body["code"] == "fake_code"
    assert backup.requests == []


@pytest.mark.parametrize(
    ("first", "second", "status"),
    [
        ("status-503", "status-429", 429),
        ("status-429", "stall", 429),
        ("status-503", "stall", 504),
        ("status-503", "reset-at-once", 502),
    ],
)
async def test_every_target_failing_says_the_most_telling(resilient, caplog, first, second, status):
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    client = await resilient({"voice": [f"fake/{first}", f"backup/{second}"]})
    with pytest.raises(openai.APIStatusError) as info:
        await streamed(client, "voice")
    assert info.value.status_code == status
    message = info.value.body["message"]
    assert f"fake/{first}" in message and f"backup/{second}" in message
    assert "k1" not in message and "k2" not in message
    if status == 429:
        assert info.value.response.headers["Retry-After"] == "7"  # the fake's
    (turn,) = turns(caplog)
    assert turn["status"] == status
    assert [a["target"] for a in turn["upstream"]["attempts"]] == [
        f"fake/{first}",
        f"backup/{second}",
    ]


async def test_a_429_cools_its_provider_down(resilient, upstream, backup):
    client = await resilient({"voice": ["fake/status-429", "backup/text"]})
    assert await streamed(client, "voice") == (TEXT, "stop")
    assert await streamed(client, "voice") == (TEXT, "stop")
    assert len(upstream.requests) == 1  # Retry-After: 7, so the second turn went on at once
    assert len(backup.requests) == 2


async def test_hedge_slow_first_target_second_wins(resilient, upstream, backup, caplog):
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    alias = {"targets": ["fake/slow-first", "backup/text"], "hedge_after_ms": 50}
    client = await resilient({"voice": alias})
    assert await streamed(client, "voice") == (TEXT, "stop")
    assert len(upstream.requests) == 1 and len(backup.requests) == 1
    # The loser's connection was closed, not left to finish (or pooled).
    await eventually(lambda: upstream.cancelled == 1)
    assert upstream.finished == 0
    (turn,) = turns(caplog)
    assert turn["provider"] == "backup" and turn["upstream"]["hedges"] == 1
    lost = turn["upstream"]["attempts"][-1]
    assert lost == {**lost, "target": "fake/slow-first", "error": "cancelled"}


async def test_hedge_fast_first_target_starts_no_second(resilient, upstream, backup):
    alias = {"targets": ["fake/text", "backup/text"], "hedge_after_ms": 300}
    client = await resilient({"voice": alias})
    assert await streamed(client, "voice") == (TEXT, "stop")
    await asyncio.sleep(0.35)  # past the hedge: nothing was left armed
    assert len(upstream.requests) == 1 and backup.requests == []


async def test_hedge_first_target_failing_moves_on_at_once(resilient, upstream, backup):
    alias = {"targets": ["fake/status-503", "backup/slow-first"], "hedge_after_ms": 5000}
    client = await resilient({"voice": alias})
    text, _ = await streamed(client, "voice")
    assert text == TEXT and len(backup.requests) == 1


async def test_hedge_a_failure_starts_one_more_not_two(resilient, upstream, backup):
    alias = {
        "targets": ["fake/status-503", "backup/slow-first", "fake/text"],
        "hedge_after_ms": 2000,
    }
    client = await resilient({"voice": alias})
    assert await streamed(client, "voice") == (TEXT, "stop")
    assert [r["model"] for r in upstream.requests] == ["status-503"]  # not the third
    assert len(backup.requests) == 1


async def test_a_passthrough_providers_429_is_its_callers_own(resilient, upstream, backup):
    client = await resilient(
        {"voice": ["fake/status-429", "backup/text"]}, fake={"api_key": "passthrough"}
    )
    for _ in range(2):
        assert await streamed(client, "voice") == (TEXT, "stop")
    assert len(upstream.requests) == 2  # not cooled down for everyone


async def test_hang_up_during_a_hedge_closes_both(resilient, upstream, backup):
    alias = {"targets": ["fake/stall", "backup/stall"], "hedge_after_ms": 30}
    client = await resilient({"voice": alias}, fake={"first_token_timeout_s": 30})
    task = asyncio.ensure_future(streamed(client, "voice"))
    await eventually(lambda: upstream.open_streams == 1 and backup.open_streams == 1)
    task.cancel()
    await eventually(lambda: upstream.open_streams == 0 and backup.open_streams == 0)
    assert upstream.cancelled == 1 and backup.cancelled == 1


async def test_breaker_opens_probes_and_closes(resilient, upstream, backup, caplog):
    caplog.set_level(logging.WARNING, logger="llmgate.upstream")
    breaker = {"failures": 2, "window_s": 30, "cooldown_s": 0.3}
    client = await resilient({"voice": ["fake/text", "backup/text"]}, fake={"breaker": breaker})
    upstream.fail_with = 503
    for _ in range(2):
        assert await streamed(client, "voice") == (TEXT, "stop")
    assert len(upstream.requests) == 2
    assert "circuit closed -> open" in caplog.text
    assert await streamed(client, "voice") == (TEXT, "stop")
    assert len(upstream.requests) == 2  # open: skipped
    await asyncio.sleep(0.35)
    assert await streamed(client, "voice") == (TEXT, "stop")  # the probe fails: open again
    assert len(upstream.requests) == 3
    assert "circuit half_open -> open" in caplog.text
    assert await streamed(client, "voice") == (TEXT, "stop")
    assert len(upstream.requests) == 3
    await asyncio.sleep(0.35)
    upstream.fail_with = None
    assert await streamed(client, "voice") == (TEXT, "stop")  # the probe succeeds
    assert "circuit half_open -> closed" in caplog.text
    backup_before = len(backup.requests)
    assert await streamed(client, "voice") == (TEXT, "stop")
    assert len(upstream.requests) == 5 and len(backup.requests) == backup_before


async def test_every_circuit_open_still_tries_the_least_recently_failed(
    resilient, upstream, backup
):
    one = {"breaker": {"failures": 1, "window_s": 30, "cooldown_s": 60}}
    client = await resilient({"voice": ["fake/text", "backup/text"]}, fake=one, second=one)
    upstream.fail_with = backup.fail_with = 503
    with pytest.raises(openai.APIStatusError):
        await streamed(client, "voice")  # both circuits open
    upstream.fail_with = backup.fail_with = None
    assert await streamed(client, "voice") == (TEXT, "stop")
    assert len(upstream.requests) == 2  # it failed first: tried all the same
    assert len(backup.requests) == 1


def test_health_circuit_states_on_a_clock():
    now = [0.0]
    from llmgate.upstream.targets import Health

    breaker = BreakerConfig(failures=3, window_s=10, cooldown_s=5)
    health = Health("p", breaker, clock=lambda: now[0])
    failure = UpstreamUnavailable("down")
    for t in (0, 11, 12):  # the first fell out of the window
        now[0] = t
        health.failed(failure)
    assert health.state == "closed" and health.usable()
    now[0] = 13
    health.failed(failure)
    assert health.state == "open" and not health.usable()
    now[0] = 18
    assert health.usable() and health.state == "half_open"
    assert asyncio.run(health.begin())
    assert not health.usable()  # one probe at a time
    health.abandoned()  # its caller hung up: no verdict, another may probe
    assert health.usable()
    asyncio.run(health.begin())
    health.succeeded()
    assert health.state == "closed" and health.usable()
    limited = UpstreamStatus(429, "slow down", headers={"Retry-After": "2"})
    health.failed(limited)
    assert health.state == "closed" and not health.usable()
    now[0] = 20.5
    assert health.usable()


async def test_models_lists_aliases_and_what_providers_list(resilient, upstream, backup):
    backup.fail_with = 503  # a provider that does not answer is left out
    client = await resilient(
        {"voice": ["fake/text", "backup/text"]}, second={"models_refresh_s": 0.05}
    )
    await eventually(lambda: upstream.model_lists == 1 and backup.model_lists >= 1)
    ids = [m.id async for m in client.models.list()]
    assert ids == ["voice", "fake/text", "fake/markdown"]
    assert upstream.headers == []  # a model list is not a chat request
    backup.fail_with = None
    await eventually(lambda: backup.model_lists >= 3)
    ids = [m.id async for m in client.models.list()]
    assert ids == ["voice", "fake/text", "fake/markdown", "backup/text", "backup/markdown"]


async def test_models_of_a_provider_with_a_list_are_not_fetched(resilient, upstream):
    client = await resilient({}, fake={"models": ["only-this"]})
    await asyncio.sleep(0.05)
    ids = [m.id async for m in client.models.list()]
    assert ids[0] == "fake/only-this" and "fake/text" not in ids
    assert upstream.model_lists == 0


async def test_one_target_alias_relays_byte_for_byte(resilient, upstream, backup):
    client = await resilient({"voice": ["backup/markdown"]})
    text, finish = await streamed(client, "voice")
    assert finish == "stop" and "**" in text
    assert backup.requests[0]["model"] == "markdown"


# --- after the first token: an apology instead of an error frame ---------------------------

APOLOGY = "Sorry, I lost my connection. Could you say that again?"


@pytest.mark.parametrize("route", ["/v1", "/v1/speech"])
@pytest.mark.parametrize("model", ["stall-mid", "error-mid", "truncated", "garbage", "voice"])
async def test_apology_ends_a_dead_stream_as_a_normal_answer(resilient, caplog, route, model):
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    client = await resilient(
        {"voice": ["fake/stall-mid", "backup/text"]},
        server={"on_stream_error": "apology"},
        routes=[
            {"path": "/chat/completions"},
            {"path": "/speech/chat/completions", "speech": True},
        ],
    )
    client = client.with_options(base_url=str(client.base_url).replace("/v1", route))
    model = model if model == "voice" else f"fake/{model}"
    text, finish = await streamed(client, model)
    assert finish == "stop"
    assert text.startswith(TEXT[:5]) and text.endswith(" " + APOLOGY)
    (turn,) = turns(caplog)
    assert turn["status"] in (502, 504) and turn["upstream"]["apology"] is True


@pytest.mark.parametrize("model", ["fake/stall-after-finish", "voice"])
async def test_no_apology_once_the_answer_finished(resilient, caplog, model):
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    client = await resilient(
        {"voice": ["fake/stall-after-finish", "backup/text"]},
        server={"on_stream_error": "apology"},
    )
    assert await streamed(client, model) == (TEXT, "stop")
    (turn,) = turns(caplog)
    assert turn["status"] == 504 and turn["upstream"]["apology"] is False


async def test_apology_not_used_before_the_first_token(resilient):
    client = await resilient({}, server={"on_stream_error": "apology"})
    with pytest.raises(openai.APIStatusError) as info:
        await streamed(client, "fake/status-503")
    assert info.value.status_code == 502


# --- the fallback rule: whether a byte has reached the caller, not how the bytes came -----


def _sse(text: str, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
    return b"data: " + json.dumps({"id": "x", "choices": [choice]}).encode() + b"\n\n"


@pytest.mark.parametrize("together", [True, False])
@pytest.mark.parametrize("death", ["end", "error", "drop"])
async def test_three_chunks_then_death_by_a_rule(aiohttp_server, together, death):
    """Chunks and their failure in one read: nothing has reached the caller, the turn
    moves on to the next target. Apart: the chunks were heard, so the answer ends with an
    error. `end`: the stream ends unfinished; `error`: an error frame; `drop`: the
    connection breaks mid-body."""
    words = _sse("one ") + _sse("two ") + _sse("three ")
    tail = b'data: {"error": {"message": "boom"}}\n\n' if death == "error" else b""
    end = b"" if death == "drop" else b"0\r\n\r\n"  # a chunked body's end, or none

    async def provider(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        # (not pooled: the body is written by hand below, the connection closed after it)
        headers = {"Content-Type": "text/event-stream", "Connection": "close"}
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        if body["model"] == "b":
            await resp.write(_sse("Whole answer.", "stop") + b"data: [DONE]\n\n")
            return resp
        transport = request.transport
        assert transport is not None
        if together:  # one write, so one read at llmgate's end
            data = words + tail
            transport.write(b"%x\r\n%s\r\n" % (len(data), data) + end)
        else:
            await resp.write(words)
            await asyncio.sleep(0.1)
            transport.write((b"%x\r\n%s\r\n" % (len(tail), tail) if tail else b"") + end)
        if death != "drop":
            await asyncio.sleep(0.05)
        transport.close()  # "drop": with the data, or after it, and no end of the body
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", provider)
    server = await aiohttp_server(app)
    raw = gateway_config(str(server.make_url("/v1")), models={"voice": ["fake/a", "fake/b"]})
    gateway = await aiohttp_server(create_app(parse(raw, {})))
    body = {"model": "voice", "stream": True, "messages": HI}
    async with (
        aiohttp.ClientSession() as s,
        s.post(gateway.make_url("/v1/chat/completions"), json=body, headers=HEADERS) as resp,
    ):
        got = await resp.read()
    if together:
        assert b"one" not in got and b"Whole answer." in got and got.endswith(b"[DONE]\n\n")
    else:
        assert b"three" in got and b"Whole answer." not in got and b'"error"' in got
