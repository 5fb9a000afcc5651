"""What llmgate says itself (a waiting phrase, a tool filler, an apology) is a whole
sentence the moment it is said: on an audio route it is heard on time, on its own, not
held for the model's next word nor glued to the answer's words."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import time

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import API_KEY
from tests.test_rag import PHRASE, kb_path  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng is not installed (Debian: sudo apt-get install espeak-ng)",
)
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
ASK = [{"role": "user", "content": "How much does express delivery cost?"}]
FILLER = "Bear with me a moment."
VOICE = {"voice": {"engine": "espeak", "pace": False}}


async def spoken(gateway, path: str, model: str) -> tuple[list[str], float | None]:
    """(the transcripts in order, seconds from the request to the first audio frame)."""
    body = {"model": model, "stream": True, "messages": ASK}
    started = time.perf_counter()
    first_audio: float | None = None
    transcripts: list[str] = []
    async with (
        aiohttp.ClientSession() as s,
        s.post(gateway.make_url(path), json=body, headers=HEADERS) as resp,
    ):
        assert resp.status == 200
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or ():
                audio = (choice.get("delta") or {}).get("audio") or {}
                if "transcript" in audio:
                    transcripts.append(audio["transcript"])
                if audio.get("data") and base64.b64decode(audio["data"]) and first_audio is None:
                    first_audio = time.perf_counter() - started
    return transcripts, first_audio


async def test_a_waiting_phrase_is_heard_at_once_before_a_slow_model(
    make_gateway, kb_path  # noqa: F811
):
    gateway = await make_gateway(
        kb={"shop": {"path": str(kb_path)}},
        rag={"shop": {"kb": "shop", "waiting": {"after_ms": 0}}},
        audio=VOICE,
        routes=[{"path": "/rag/chat/completions", "rag": "shop", "audio": "voice"}],
    )
    transcripts, first_audio = await spoken(
        gateway, "/v1/rag/chat/completions", "slow-first-2s"
    )
    assert transcripts[0] == PHRASE  # a sentence of its own
    # heard while the model still thinks (2 s), not with its first word; judged loosely
    assert first_audio is not None and first_audio < 1.2, first_audio


async def test_a_tool_filler_is_heard_when_due_and_on_its_own(make_gateway, aiohttp_server):
    async def slow_tool(request: web.Request) -> web.Response:
        await asyncio.sleep(1.5)
        return web.json_response({"sky": "sunny"})

    app = web.Application()
    app.router.add_post("/weather", slow_tool)
    tool = await aiohttp_server(app)
    gateway = await make_gateway(
        tools={"weather": {"kind": "http", "url": str(tool.make_url("/weather"))}},
        audio=VOICE,
        routes=[{
            "path": "/tools/chat/completions", "tools": ["weather"], "audio": "voice",
            "tool_filler": {"phrases": [FILLER], "after_ms": 200},
        }],
    )
    started = time.perf_counter()
    transcripts, _ = await spoken(gateway, "/v1/tools/chat/completions", "use-tools-weather")
    assert time.perf_counter() - started > 1.5  # the tool took its time
    assert FILLER in transcripts  # its own sentence, not glued to the answer's words
    assert transcripts.index(FILLER) < len(transcripts) - 1  # and before the answer


async def test_an_apology_follows_the_cut_sentence_as_its_own(make_gateway, upstream):
    gateway = await make_gateway(
        server={"on_stream_error": "apology"},
        providers={"fake": {"base_url": upstream.url, "idle_timeout_s": 0.3}},
        audio=VOICE,
        routes=[{"path": "/audio/chat/completions", "audio": "voice"}],
    )
    transcripts, _ = await spoken(gateway, "/v1/audio/chat/completions", "stall-mid")
    # the answer was cut after "Hello": that ends, then the apology is said apart from it
    assert transcripts == ["Hello", "Sorry, I lost my connection. Could you say that again?"]


async def test_what_the_answer_held_goes_before_the_phrase():
    """The speech stage holds a word's first letter back (an "h" may begin a link); an
    apology after it must come after that letter, not swallow it."""
    from llmgate.pipeline import Ask, Piece
    from llmgate.stages.speech import SpeechStage
    from llmgate.text.speakable import SpeechOptions
    from llmgate.turn import Turn
    from tests.fake_upstream import chunk

    async def provider(ask):
        yield Piece.of(chunk("m", {"role": "assistant", "content": "Call h"}))
        yield Piece.of(chunk("m", {"content": " Sorry, I lost my connection."}), whole=True)
        yield Piece.of(chunk("m", {}, "stop"), whole=True)

    ask = Ask({"model": "m"}, Turn("/s"), None, None, None)  # type: ignore[arg-type]
    said = []
    async for piece in SpeechStage(SpeechOptions()).wrap(provider)(ask):
        for choice in json.loads(piece.data)["choices"]:
            said.append(choice["delta"].get("content") or "")
    assert "".join(said) == "Call h Sorry, I lost my connection."
