"""Fixtures: a fake upstream on 127.0.0.1, llmgate in front of it, and the openai client."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestServer

from llmgate.app import create_app
from llmgate.config import parse
from tests.fake_upstream import FakeUpstream

API_KEY = "test-key"


def gateway_config(upstream_url: str, **sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "server": {"api_keys": [API_KEY]},
        "providers": {
            "fake": {
                "base_url": upstream_url,
                "api_key": "upstream-secret",
                "models": ["text"],
                "idle_timeout_s": 2,
                "first_token_timeout_s": 2,
            }
        },
    }
    for name, values in sections.items():
        if name == "providers" or isinstance(values, list):
            raw[name] = values
        else:
            raw.setdefault(name, {}).update(values)
    return raw


@pytest.fixture
def kb_config(tmp_path) -> Path:
    """A folder holding c.toml with one knowledge base, `docs` (kb/docs.sqlite), for the
    `kb` commands run there."""
    (tmp_path / "c.toml").write_text(
        '[providers.a]\nbase_url = "http://127.0.0.1:9/v1"\n'
        '[kb.docs]\npath = "kb/docs.sqlite"\nchunk_tokens = 100\n'
    )
    return tmp_path


@pytest.fixture
async def upstream(aiohttp_server) -> FakeUpstream:
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app)
    fake.url = str(server.make_url("/v1"))  # type: ignore[attr-defined]
    return fake


GatewayFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
def make_gateway(aiohttp_server, upstream) -> GatewayFactory:
    async def make(env: dict[str, str] | None = None, **sections: Any) -> TestServer:
        raw = copy.deepcopy(gateway_config(upstream.url, **sections))
        return await aiohttp_server(create_app(parse(raw, env or {})))

    return make


@pytest.fixture
async def gateway(make_gateway) -> TestServer:
    return await make_gateway()


def openai_client(gateway: TestServer, api_key: str = API_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=str(gateway.make_url("/v1")), api_key=api_key, max_retries=0, timeout=10
    )


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., openai.AsyncOpenAI]]:
    """openai clients for any gateway a test makes, closed at the end of the test."""
    made: list[openai.AsyncOpenAI] = []

    def make(gateway: TestServer, api_key: str = API_KEY) -> openai.AsyncOpenAI:
        made.append(openai_client(gateway, api_key))
        return made[-1]

    yield make
    for c in made:
        await c.close()


@pytest.fixture
def client(gateway, connect) -> openai.AsyncOpenAI:
    return connect(gateway)


def stream_chunks(raw: bytes) -> list[dict]:
    """A whole SSE answer's chunks, checking that it ended with `[DONE]`."""
    payloads = [f[6:] for f in raw.split(b"\n\n") if f.startswith(b"data: ")]
    assert payloads[-1] == b"[DONE]", payloads[-1]
    return [json.loads(p) for p in payloads[:-1]]


def split_at(text, cuts):
    """`text` (str or bytes) cut at the sorted positions `cuts`: the reads or deltas a
    stream may bring it in."""
    bounds = sorted(min(c, len(text)) for c in cuts)
    return [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until `predicate()` holds: for effects another task or process will show soon."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)
