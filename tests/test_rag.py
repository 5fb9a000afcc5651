"""A RAG route: passages from the knowledge base in the upstream request, and "one moment"."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from pathlib import Path

import aiohttp
import openai
import pytest
from aiohttp import web

from llmgate.kb.ingest import ingest
from llmgate.kb.store import Store
from llmgate.stages.rag import NOTHING_FOUND
from tests.conftest import API_KEY, eventually, stream_chunks
from tests.fake_upstream import WORDS

DATA = Path(__file__).parent / "data"
PHRASE = "One moment, let me check."


@pytest.fixture
def kb_path(tmp_path) -> Path:
    store = Store(tmp_path / "shop.sqlite")
    ingest(store, [DATA / "shop.md"], 60, 10)
    store.close()
    return tmp_path / "shop.sqlite"


@pytest.fixture
def rag_gateway(make_gateway, kb_path):
    async def make(**waiting):
        rag = {"kb": "shop", "top_k": 3}
        if waiting:
            rag["waiting"] = waiting
        return await make_gateway(
            kb={"shop": {"path": str(kb_path)}},
            rag={"shop": rag},
            routes=[{"path": "/rag/chat/completions", "rag": "shop"}],
        )

    return make


def rag_client(connect, gateway) -> openai.AsyncOpenAI:
    return connect(gateway).with_options(base_url=str(gateway.make_url("/rag")))


CONVERSATION = [
    {"role": "system", "content": "You are the Lumen store's assistant."},
    {"role": "user", "content": "How much does express delivery cost?"},
    {"role": "assistant", "content": "It costs 9.95 pounds."},
    {"role": "user", "content": "And the standard one?"},
]


async def test_passages_reach_the_provider_just_before_the_question(
    rag_gateway, connect, upstream
):
    client = rag_client(connect, await rag_gateway())
    stream = await client.chat.completions.create(
        model="text", messages=CONVERSATION, stream=True
    )
    chunks = [c async for c in stream]  # the openai SDK parses the whole stream
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == PHRASE + " " + "".join(WORDS)
    assert chunks[-1].choices[0].finish_reason == "stop"
    sent = upstream.requests[0]["messages"]
    assert sent[:3] == CONVERSATION[:3] and sent[4] == CONVERSATION[3]
    assert sent[3]["role"] == "system" and "4.95 pounds" in sent[3]["content"]
    assert "Delivery" in sent[3]["content"]
    assert len(sent) == len(CONVERSATION) + 1


async def test_nothing_found_says_so(rag_gateway, connect, upstream):
    client = rag_client(connect, await rag_gateway())
    question = [{"role": "user", "content": "Xylophone zeppelin quasar?"}]
    await client.chat.completions.create(model="text", messages=question)
    assert upstream.requests[0]["messages"][0] == {"role": "system", "content": NOTHING_FOUND}


async def raw_frames(gateway, model: str) -> list[dict]:
    body = {"model": model, "stream": True, "messages": CONVERSATION}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = gateway.make_url("/rag/chat/completions")
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=headers) as resp:
        raw = await resp.read()
    return stream_chunks(raw)


async def test_the_waiting_message_is_a_whole_chunk_first(rag_gateway):
    first, *_ = await raw_frames(await rag_gateway(), "text")
    assert first["object"] == "chat.completion.chunk" and first["id"].startswith("chatcmpl-")
    assert first["model"] == "text" and isinstance(first["created"], int)
    assert first["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": PHRASE + " "},
            "logprobs": None,
            "finish_reason": None,
        }
    ]


async def test_the_waiting_phrases_take_turns(rag_gateway):
    gateway = await rag_gateway(phrases=["One moment.", "Let me look."])
    said = [(await raw_frames(gateway, "text"))[0]["choices"][0]["delta"]["content"]
            for _ in range(3)]
    assert said == ["One moment. ", "Let me look. ", "One moment. "]


@pytest.mark.parametrize(("model", "filler"), [("text", False), ("slow-first", True)])
async def test_after_ms_speaks_only_when_the_wait_is_real(rag_gateway, model, filler):
    gateway = await rag_gateway(phrases=["Let me look."], after_ms=150)
    frames = await raw_frames(gateway, model)
    contents = [f["choices"][0]["delta"].get("content") for f in frames if f["choices"]]
    assert (contents[0] == "Let me look. ") is filler
    assert "".join(c or "" for c in contents).endswith("".join(WORDS))


async def test_no_waiting_message_in_a_non_streamed_answer(rag_gateway, connect, upstream):
    client = rag_client(connect, await rag_gateway())
    completion = await client.chat.completions.create(model="text", messages=CONVERSATION)
    assert completion.choices[0].message.content == "".join(WORDS)
    assert "4.95 pounds" in upstream.requests[0]["messages"][3]["content"]


async def test_the_turn_line_has_the_retrieval(rag_gateway, caplog):
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    await raw_frames(await rag_gateway(), "text")
    [line] = [r.turn for r in caplog.records if r.name == "llmgate.turn"]
    rag = line["rag"]
    assert rag["hits"] == 3 and rag["top_score"] > 0 and rag["waiting"] is True
    assert rag["retrieval_ms"] >= 0


async def test_a_hang_up_while_waiting_stops_the_upstream_at_once(
    make_gateway, kb_path, upstream
):
    gateway = await make_gateway(
        providers={"fake": {"base_url": upstream.url, "first_token_timeout_s": 60}},
        kb={"shop": {"path": str(kb_path)}},
        rag={"shop": {"kb": "shop", "waiting": {"after_ms": 5000}}},  # a helper task waits
        routes=[{"path": "/rag/chat/completions", "rag": "shop"}],
    )
    body = {"model": "stall", "stream": True, "messages": CONVERSATION}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            gateway.make_url("/rag/chat/completions"), json=body, headers=headers
        )
        await eventually(lambda: upstream.open_streams == 1)
        resp.close()
        await eventually(lambda: upstream.cancelled == 1)


async def test_a_missing_knowledge_base_still_answers(make_gateway, connect, tmp_path, upstream):
    gateway = await make_gateway(
        kb={"shop": {"path": str(tmp_path / "none.sqlite")}},
        rag={"shop": {"kb": "shop"}},
        routes=[{"path": "/rag/chat/completions", "rag": "shop"}],
    )
    completion = await rag_client(connect, gateway).chat.completions.create(
        model="text", messages=CONVERSATION
    )
    assert completion.choices[0].message.content == "".join(WORDS)
    assert NOTHING_FOUND in json.dumps(upstream.requests[0]["messages"])


class RetrievalService:
    """An operator's own retrieval service on 127.0.0.1, scripted by the query."""

    def __init__(self) -> None:
        self.asked: list[dict] = []
        self.app = web.Application()
        self.app.router.add_post("/search", self.search)

    async def search(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.asked.append({**body, "auth": request.headers.get("Authorization")})
        if "broken" in body["query"]:
            return web.json_response({"error": "down"}, status=500)
        if "shapeless" in body["query"]:
            return web.json_response({"results": []})
        if "slow" in body["query"]:
            await asyncio.sleep(5)
        passages = [
            {"text": "Gates open at nine.", "source": "castle.md", "score": 2.5},
            {"text": "The moat is deep.", "source": "castle.md", "heading": "Moat"},
            {"text": "Low score.", "score": -1.0},
        ]
        return web.json_response({"passages": passages})


@pytest.fixture
async def service_gateway(aiohttp_server, make_gateway):
    service = RetrievalService()
    server = await aiohttp_server(service.app)
    kb = {"kind": "http", "url": str(server.make_url("/search")), "timeout_s": 0.5,
          "headers": {"Authorization": "Bearer kb-secret"}}
    gateway = await make_gateway(
        kb={"remote": kb},
        rag={"remote": {"kb": "remote", "top_k": 3, "waiting": {"phrases": []}}},
        routes=[{"path": "/rag/chat/completions", "rag": "remote"}],
    )
    return gateway, service


async def test_the_http_retriever_contract(service_gateway, connect, upstream):
    gateway, service = service_gateway
    question = [{"role": "user", "content": "When do the castle gates open?"}]
    await rag_client(connect, gateway).chat.completions.create(model="text", messages=question)
    assert service.asked == [
        {"query": "When do the castle gates open?", "k": 3, "auth": "Bearer kb-secret"}
    ]
    system = upstream.requests[0]["messages"][0]["content"]
    assert "[1] (castle.md)\nGates open at nine." in system
    assert "[2] (castle.md - Moat)\nThe moat is deep." in system
    assert "Low score." not in system  # below min_score


@pytest.mark.parametrize("query", ["broken", "shapeless", "slow"])
async def test_a_failing_retrieval_service_still_gets_an_answer(
    service_gateway, connect, upstream, caplog, query
):
    gateway, _ = service_gateway
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    completion = await rag_client(connect, gateway).chat.completions.create(
        model="text", messages=[{"role": "user", "content": query}]
    )
    assert completion.choices[0].message.content == "".join(WORDS)
    assert upstream.requests[0]["messages"][0]["content"] == NOTHING_FOUND
    [line] = [r.turn for r in caplog.records if r.name == "llmgate.turn"]
    assert line["rag"]["error"] == "KbError"


def _conversation(turns: int) -> list[dict]:
    """A call's history after `turns` turns, as Agora's engine sends it back."""
    messages = [{"role": "system", "content": "You are the Lumen store's assistant."}]
    questions = ["How much does express delivery cost?", "And the standard one?",
                 "Do you ship to Canada?"]
    for i in range(turns):
        messages.append({"role": "user", "content": questions[i]})
        if i < turns - 1:
            messages.append({"role": "assistant", "content": f"Answer {i}."})
    return messages


@pytest.mark.parametrize("placement", ["before_question", "system"])
async def test_each_turns_prompt_extends_the_last_up_to_its_passages(
    make_gateway, kb_path, connect, upstream, placement
):
    gateway = await make_gateway(
        kb={"shop": {"path": str(kb_path)}},
        rag={"shop": {"kb": "shop", "placement": placement, "waiting": {"phrases": []}}},
        routes=[{"path": "/rag/chat/completions", "rag": "shop"}],
    )
    client = rag_client(connect, gateway)
    for turns in (1, 2, 3):
        await client.chat.completions.create(model="text", messages=_conversation(turns))
    bodies = [json.dumps(body).encode() for body in upstream.requests]
    prefixes = [body[: body.index(b"the knowledge base")] for body in bodies]
    prefixes = [p[: p.rindex(b'{"role": "system"')] for p in prefixes]
    pairs = list(itertools.pairwise(prefixes))
    extends = [later.startswith(earlier) for earlier, later in pairs]
    grows = [len(later) > len(earlier) for earlier, later in pairs]
    if placement == "before_question":
        assert extends == [True, True] and grows == [True, True]  # the cache holds it all
    else:
        assert grows == [False, False]  # only the system prompt stays the same


@pytest.mark.parametrize("placement", ["before_question", "in_question", "system"])
async def test_appended_user_turns_and_a_trailing_assistant_message(
    make_gateway, kb_path, connect, upstream, placement
):
    gateway = await make_gateway(
        kb={"shop": {"path": str(kb_path)}},
        rag={"shop": {"kb": "shop", "placement": placement, "query_turns": 2}},
        routes=[{"path": "/rag/chat/completions", "rag": "shop"}],
    )
    appended = [  # interruption off: the engine appends the next user turn
        {"role": "system", "content": "You are the Lumen store's assistant."},
        {"role": "user", "content": "How much is delivery"},
        {"role": "user", "content": "to Canada?"},
    ]
    ending = [*appended, {"role": "assistant", "content": "Let me"}]
    for messages in (appended, ending):
        upstream.requests.clear()
        completion = await rag_client(connect, gateway).chat.completions.create(
            model="text", messages=messages
        )
        assert completion.choices[0].message.content
        sent = upstream.requests[0]["messages"]
        roles = [m["role"] for m in sent]
        with_passages = [i for i, m in enumerate(sent) if "knowledge base" in str(m)]
        assert len(with_passages) == 1
        at = with_passages[0]
        if placement == "before_question":
            assert roles[at] == "system" and roles[at + 1 : at + 3] == ["user", "user"]
        elif placement == "in_question":
            assert sent[at]["role"] == "user" and sent[at]["content"].endswith("to Canada?")
        else:
            assert at == 1 and roles[at] == "system"
        # nothing assumes user and assistant alternate: the request's end is its own
        assert roles[-len(messages) + 1 :] == [m["role"] for m in messages[1:]]
        if messages[-1]["role"] == "assistant":
            assert sent[-1] == messages[-1]
