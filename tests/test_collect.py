"""A non-streamed request on a staged route or an alias: the answer llmgate assembles from
the provider's stream carries every field the provider's own answer would."""

from __future__ import annotations

import json

import pytest
from aiohttp import web

from llmgate.app import create_app
from llmgate.config import parse
from tests.conftest import gateway_config, openai_client

HI = [{"role": "user", "content": "hi"}]
USAGE = {
    "prompt_tokens": 9,
    "completion_tokens": 2,
    "total_tokens": 11,
    "prompt_tokens_details": {"cached_tokens": 4},
    "completion_tokens_details": {"reasoning_tokens": 0},
}
CITE = {"type": "url_citation", "url_citation": {"url": "https://x.example", "title": "X",
                                                 "start_index": 0, "end_index": 5}}


def _token(text: str) -> dict:
    return {"token": text, "logprob": -0.1, "bytes": list(text.encode()), "top_logprobs": []}


def chunks() -> list[dict]:
    head = {
        "id": "chatcmpl-rich", "object": "chat.completion.chunk", "created": 1700000000,
        "model": "rich", "system_fingerprint": "fp_rich", "service_tier": "default",
    }

    def chunk(delta: dict, finish: str | None = None, logprobs=None, **extra) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**head, "choices": [choice], **extra}

    return [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hello"}, logprobs={"content": [_token("Hello")], "refusal": None}),
        chunk({"content": " there", "annotations": [CITE]},
              logprobs={"content": [_token(" there")], "refusal": None}),
        chunk({}, "stop"),
        {**head, "choices": [], "usage": USAGE},
    ]


async def rich(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    assert body["stream"] is True and body["stream_options"]["include_usage"] is True
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for c in chunks():
        await resp.write(b"data: " + json.dumps(c).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    return resp


@pytest.mark.parametrize("path", ["/v1/speech", "/v1"])
async def test_an_assembled_answer_keeps_every_field(aiohttp_server, path):
    app = web.Application()
    app.router.add_post("/v1/chat/completions", rich)
    provider = await aiohttp_server(app)
    raw = gateway_config(
        str(provider.make_url("/v1")),
        routes=[{"path": "/chat/completions"}, {"path": "/speech/chat/completions",
                                                "speech": True}],
        models={"two": ["fake/rich", "fake/rich"]},  # an alias: collected too
    )
    gateway = await aiohttp_server(create_app(parse(raw, {})))
    client = openai_client(gateway).with_options(base_url=str(gateway.make_url(path)))
    try:
        answer = await client.chat.completions.create(
            model="two" if path == "/v1" else "rich", messages=HI, logprobs=True
        )
    finally:
        await client.close()
    assert answer.id == "chatcmpl-rich" and answer.model == "rich"
    assert answer.system_fingerprint == "fp_rich" and answer.service_tier == "default"
    assert answer.usage is not None and answer.usage.model_dump(exclude_none=True) == USAGE
    (choice,) = answer.choices
    assert choice.message.content == "Hello there" and choice.finish_reason == "stop"
    assert choice.logprobs is not None
    assert [t.token for t in choice.logprobs.content or []] == ["Hello", " there"]
    assert choice.message.annotations is not None
    assert choice.message.annotations[0].url_citation.url == "https://x.example"
