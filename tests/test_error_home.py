"""One home for what a caller is told of a failure: llmgate's own bug, wherever it is
raised (a turn before its answer began, an endpoint that is not a turn, a stream after its
200), is the same 500 envelope naming the request, logged once with its traceback, its text
never sent."""

from __future__ import annotations

import json
import logging

import aiohttp
import openai
import pytest

from tests.conftest import API_KEY

HI = [{"role": "user", "content": "hi"}]
SECRET = "sk-leaked-in-an-exception"


def _boom(*args, **kwargs):
    raise RuntimeError(SECRET)


def _unhandled(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("unhandled error")]


def _said_once(caplog, request_id: str) -> None:
    records = _unhandled(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert request_id in records[0].getMessage()
    assert records[0].exc_info is not None  # the traceback is the operator's


async def test_a_turns_bug_before_its_answer(gateway, client, monkeypatch, caplog):
    monkeypatch.setattr("llmgate.server.handlers.build", _boom)
    for stream in (True, False):
        caplog.clear()
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="text", messages=HI, stream=stream)
        request_id = info.value.response.headers["X-Request-Id"]
        body = info.value.body
        assert body["message"] == f"internal error in llmgate (request {request_id})"
        assert (body["type"], body["code"]) == ("api_error", "internal_error")
        assert SECRET not in info.value.response.text
        _said_once(caplog, request_id)


async def test_a_bug_outside_a_turn(gateway, client, monkeypatch, caplog):
    monkeypatch.setattr("llmgate.upstream.router.Router.models", _boom)
    with pytest.raises(openai.InternalServerError) as info:
        await client.models.list()
    request_id = info.value.response.headers["X-Request-Id"]
    assert info.value.body["message"] == f"internal error in llmgate (request {request_id})"
    assert info.value.body["code"] == "internal_error"
    assert SECRET not in info.value.response.text
    _said_once(caplog, request_id)


async def test_a_bug_after_the_answer_began(gateway, monkeypatch, caplog):
    # the writer's own bug once the first frame is out: the stream's error frame
    from llmgate.server import stream

    real = stream._write
    writes = 0

    async def write(sse, data, last=False):
        nonlocal writes
        writes += 1
        if writes == 2:
            _boom()
        await real(sse, data, last)

    monkeypatch.setattr(stream, "_write", write)
    async with aiohttp.ClientSession() as session, session.post(
        gateway.make_url("/v1/chat/completions"),
        json={"model": "slow-words", "messages": HI, "stream": True},
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as resp:
        assert resp.status == 200
        request_id = resp.headers["X-Request-Id"]
        raw = await resp.read()
    assert b"[DONE]" not in raw and SECRET.encode() not in raw
    frames = [f[6:] for f in raw.split(b"\n\n") if f.startswith(b"data: ")]
    error = json.loads(frames[-1])["error"]
    assert error["message"] == f"internal error in llmgate (request {request_id})"
    assert error["code"] == "internal_error"
    _said_once(caplog, request_id)
