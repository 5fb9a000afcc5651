"""The official openai client against llmgate in front of a fake upstream."""

from __future__ import annotations

from tests.fake_upstream import WORDS

MESSAGES = [{"role": "user", "content": "hi"}]


async def test_streaming_text(client, upstream):
    stream = await client.chat.completions.create(model="text", messages=MESSAGES, stream=True)
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(WORDS)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert upstream.requests[0]["model"] == "text"
