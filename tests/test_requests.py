"""What callers send: validation errors as envelopes, auth, and what reaches the provider."""

from __future__ import annotations

import json
import logging

import aiohttp
import pytest

from tests.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
HI = [{"role": "user", "content": "hi"}]


async def post(gateway, body, headers=AUTH, path="/v1/chat/completions"):
    async with aiohttp.ClientSession() as s:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with s.post(gateway.make_url(path), data=data, headers=headers) as resp:
            return resp.status, await resp.json(), resp.headers


def assert_envelope(body, type_="invalid_request_error"):
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_
    assert body["error"]["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", "$"),
        ({"model": "text"}, "$.messages"),
        ({"model": "text", "messages": []}, "$.messages"),
        ({"model": "text", "messages": "hi"}, "$.messages"),
        ({"model": "text", "messages": [{"role": "robot", "content": "x"}]}, "$.messages[0].role"),
        ({"model": "text", "messages": [{"content": "x"}]}, "$.messages[0].role"),
        ({"model": "text", "messages": [{"role": "user"}]}, "$.messages[0].content"),
        ({"model": 5, "messages": HI}, "$.model"),
        ({"model": "text", "messages": HI, "temperature": "hot"}, "$.temperature"),
        (
            {"model": "text", "messages": [{"role": "user", "content": [{"type": "video"}]}]},
            "$.messages[0].content[0].type",
        ),
        ({"messages": HI}, "$.model"),
    ],
)
async def test_bad_input_is_400_with_param(gateway, upstream, body, param):
    status, reply, _ = await post(gateway, body)
    assert status == 400
    assert_envelope(reply)
    assert reply["error"]["param"] == param
    assert upstream.requests == []


async def test_missing_and_wrong_key_are_401(gateway):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        status, reply, _ = await post(gateway, {"model": "text", "messages": HI}, headers)
        assert status == 401
        assert_envelope(reply)
        assert reply["error"]["code"] == "invalid_api_key"


async def test_unknown_path_404_and_wrong_method_405_are_envelopes(gateway):
    async with aiohttp.ClientSession() as s:
        async with s.get(gateway.make_url("/nope"), headers=AUTH) as resp:
            assert resp.status == 404
            assert_envelope(await resp.json())
        async with s.get(gateway.make_url("/v1/chat/completions"), headers=AUTH) as resp:
            assert resp.status == 405
            body = await resp.json()
            assert_envelope(body)
            assert body["error"]["code"] == "method_not_allowed"
            assert "POST" in resp.headers["Allow"]
        async with s.get(gateway.make_url("/healthz")) as resp:
            assert resp.status == 200
        async with s.get(gateway.make_url("/v1/models")) as resp:
            assert resp.status == 401


async def test_route_is_served_with_and_without_v1(gateway, upstream):
    for path in ("/chat/completions", "/v1/chat/completions"):
        status, _, _ = await post(gateway, {"model": "text", "messages": HI}, path=path)
        assert status == 200
    assert len(upstream.requests) == 2


async def test_agora_request_is_accepted_and_engine_fields_stay_home(gateway, upstream, caplog):
    body = {
        "model": "text",
        "stream": False,
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
                "turn_id": 3,
                "timestamp": 1732000000000,
                "metadata": {"source": "asr", "interrupted": False},
            },
        ],
        "context": {"appId": "app1", "userId": "u1", "channel": "ch1"},
        "app_id": "app1",
        "channel": "ch1",
        "temperature": 0.25,
        "max_tokens": 100,
        "verbosity": "low",  # an OpenAI parameter our Structs do not type
    }
    with caplog.at_level(logging.INFO, logger="llmgate.turn"):
        status, _, headers = await post(gateway, body)
    assert status == 200
    sent = upstream.requests[0]
    assert set(sent) == {"model", "stream", "messages", "temperature", "max_tokens", "verbosity"}
    assert sent["temperature"] == 0.25 and sent["verbosity"] == "low"
    assert sent["messages"][1] == {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ],
    }
    [record] = [r for r in caplog.records if r.name == "llmgate.turn"]
    meta = record.turn["metadata"]
    assert meta["context"] == body["context"]
    assert (meta["app_id"], meta["channel"], meta["turn_id"]) == ("app1", "ch1", 3)
    assert record.turn["request_id"] == headers["X-Request-Id"]
    assert "what is this" not in json.dumps(record.turn)


async def test_forward_fields_sends_named_extras(make_gateway, upstream):
    gw = await make_gateway(
        providers={"fake": {"base_url": upstream.url, "forward_fields": ["top_k"]}},
        server={"api_keys": []},
    )
    status, _, _ = await post(gw, {"model": "text", "messages": HI, "top_k": 5, "channel": "c"})
    assert status == 200
    assert upstream.requests[0]["top_k"] == 5
    assert "channel" not in upstream.requests[0]


async def test_upstream_key_is_ours_not_the_callers(gateway, upstream):
    await post(gateway, {"model": "text", "messages": HI})
    assert upstream.headers[0]["Authorization"] == "Bearer upstream-secret"


async def test_passthrough_forwards_the_callers_key(make_gateway, upstream):
    gw = await make_gateway(
        providers={"fake": {"base_url": upstream.url, "api_key": "passthrough"}},
        server={"api_keys": []},
    )
    await post(gw, {"model": "text", "messages": HI}, {"Authorization": "Bearer caller-key"})
    assert upstream.headers[0]["Authorization"] == "Bearer caller-key"


async def test_default_model_fills_a_missing_model(make_gateway, upstream):
    gw = await make_gateway(providers={"fake": {"base_url": upstream.url, "default_model": "text"}})
    status, _, _ = await post(gw, {"messages": HI})
    assert status == 200
    assert upstream.requests[0]["model"] == "text"


async def test_a_stream_request_that_fails_validation_is_logged_as_one(gateway, caplog):
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    status, _, _ = await post(gateway, {"model": "text", "stream": True, "messages": []})
    assert status == 400
    (turn,) = [r.turn for r in caplog.records if r.name == "llmgate.turn"]
    assert turn["stream"] is True and turn["status"] == 400
