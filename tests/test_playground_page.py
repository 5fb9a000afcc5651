"""GET /playground: the page, its files and routes, and the page at work in a real Chromium.

The browser tests share one headless Chromium (tests/browser.py), launched once for the
module; the gateway is the real one in front of the fake upstream, as everywhere else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
from importlib import resources
from unittest import mock

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from yarl import URL

from llmgate.config import Config, PlaygroundConfig, parse
from llmgate.server import playground
from llmgate.server.playground import CSP, Events, Files, Routes
from tests.browser import Browser, Tab
from tests.conftest import API_KEY, eventually
from tests.fake_upstream import text_chunks
from tests.test_cancellation import agora_body
from tests.test_tools import CITY, service  # noqa: F401 (fixture)

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
ON = {"enabled": True}
EVIL = "<img src=x onerror=alert(1)>"
espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


async def get(gateway, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    url = URL(str(gateway.make_url("/")).rstrip("/") + path, encoded=True)  # sent as written
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.read()


# ------------------------------------------------------------------ the files and routes


async def test_the_page_is_served_with_a_strict_policy(make_gateway):
    gateway = await make_gateway(playground=ON)
    status, headers, body = await get(gateway, "/playground")  # the page itself needs no key
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Content-Security-Policy"] == CSP
    assert "script-src 'self';" in CSP and "unsafe-inline" not in CSP
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Cache-Control"] == "no-store"
    assert body == (resources.files("llmgate") / "playground" / "index.html").read_bytes()
    # nothing inline for the policy to refuse: every script and style is a file of its own
    assert b"<script>" not in body and b"<style" not in body and b" style=" not in body
    assert not re.search(rb"\son[a-z]+\s*=", body)  # no onclick= and the like
    served = {}
    for name, kind in [("playground.js", "text/javascript"), ("playground.css", "text/css")]:
        status, headers, served[name] = await get(gateway, "/playground/static/" + name)
        assert status == 200 and headers["Content-Type"] == kind + "; charset=utf-8"
        assert headers["Content-Security-Policy"] == CSP
        assert headers["X-Content-Type-Options"] == "nosniff"
    script = served["playground.js"]
    for html in (b"innerHTML", b"outerHTML", b"insertAdjacentHTML", b"document.write", b"eval("):
        assert html not in script  # text from the model, tools or documents stays text


async def test_every_playground_path_is_off_unless_enabled(gateway):
    for path in ("/playground", "/playground/static/playground.js", "/playground/routes",
                 "/playground/events"):
        status, _, body = await get(gateway, path, HEADERS)
        assert status == 404, path
        assert json.loads(body)["error"]["message"].startswith("no such endpoint")


async def test_only_the_pages_own_files_are_served(make_gateway):
    gateway = await make_gateway(playground=ON)
    for path in (
        "/playground/static/../../config.py", "/playground/static/..%2F..%2Fconfig.py",
        "/playground/static/%2e%2e/%2e%2e/server/playground.py",
        "/playground/static/playground.py", "/playground/static/", "/playground/static",
        "/playground/static/PLAYGROUND.JS", "/playground/static/playground.js/",
        "/playground/static//etc/passwd", "/playground/../llmgate/config.py",
    ):
        status, _, body = await get(gateway, path)
        assert status == 404, path
        assert b"import" not in body and b"root:" not in body


SECTIONS = {
    "audio": {"voice": {"engine": "espeak", "sample_rate": 24000}},
    "tools": {"weather": {"kind": "http", "url": "http://127.0.0.1:9/weather"}},
    "routes": [
        {"path": "/chat/completions"},
        {"path": "/audio/chat/completions", "audio": "voice"},
        {"path": "/v1/tools/chat/completions", "tools": ["weather"], "speech": True,
         "tool_filler": {"phrases": ["Hold on."]}},
    ],
}


def routes_config() -> Config:
    return parse({
        "server": {"api_keys": [API_KEY], "on_stream_error": "apology"},
        "providers": {"fake": {"base_url": "http://127.0.0.1:9/v1"}},
        "playground": ON,
        **SECTIONS,
    }, {}).config


async def test_the_routes_need_a_key_and_say_their_stages(make_gateway):
    gateway = await make_gateway(
        playground=ON, server={"on_stream_error": "apology"}, **SECTIONS
    )
    status, _, body = await get(gateway, "/playground/routes")
    assert status == 401 and "error" in json.loads(body)  # OpenAI's envelope
    status, headers, body = await get(gateway, "/playground/routes", HEADERS)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    listed = json.loads(body)
    chat = [r for r in listed if r["kind"] == "chat"]
    assert [r["path"] for r in chat] == [
        "/chat/completions", "/audio/chat/completions", "/v1/tools/chat/completions"
    ]
    plain, audio, tools = chat
    assert plain["paths"] == ["/chat/completions", "/v1/chat/completions"]
    assert plain["stages"] == {"rag": None, "audio": None, "tools": [], "speech": False}
    assert audio["stages"]["audio"] == {"name": "voice", "engine": "espeak", "sample_rate": 24000}
    assert audio["stages"]["speech"] is True  # an audio route speaks what it says
    assert tools["paths"] == ["/v1/tools/chat/completions", "/tools/chat/completions"]
    assert tools["stages"]["tools"] == ["weather"] and tools["stages"]["speech"] is True
    assert tools["phrases"]["filler"] == ["Hold on."] and tools["phrases"]["apology"]
    assert {r["path"] for r in listed if r["kind"] == "models"} == {"/v1/models", "/models"}
    for route in chat:  # every path listed is served
        for path in route["paths"]:
            status, _, _ = await get(gateway, path, HEADERS)
            assert status == 405, path  # (a POST route)


@pytest.mark.parametrize("path", ["/playground", "/playground/static/playground.js",
                                  "/playground/routes", "/playground/events"])
async def test_every_playground_path_is_for_loopback_callers_only(path):
    keys = mock.Mock()
    table = playground.routes(routes_config(), mock.Mock(keys=keys))
    method, handle = table[path]

    def request(remote: str):
        transport = mock.Mock()
        transport.get_extra_info.side_effect = lambda name, default=None: (
            (remote, 5555) if name == "peername" else default
        )
        return make_mocked_request(method, path, transport=transport)

    with pytest.raises(Exception) as info:
        await handle(request("10.1.2.3"))
    assert getattr(info.value, "status", None) == 403
    keys.assert_not_called()
    allowed = PlaygroundConfig(enabled=True, allow_remote=True)
    if path == "/playground":
        response = await Files(allowed).handler("index.html")(request("10.1.2.3"))
        assert response.status == 200
    if path == "/playground/routes":
        await Routes(Config(playground=allowed), keys).handle(request("10.1.2.3"))
        keys.assert_called_once()
    if path == "/playground/events":
        assert isinstance(Events(allowed, keys), Events)


# ------------------------------------------------------------------ in a real browser


@pytest.fixture(scope="module")
def browser():
    chromium = Browser()
    yield chromium
    chromium.close()


@pytest.fixture
async def playground_gateway(make_gateway, upstream):
    return await make_gateway(
        playground=ON,
        # only a hang-up or a newer turn ends a turn early here, never a provider's timeout
        providers={"fake": {"base_url": upstream.url, "idle_timeout_s": 60}},
        audio={"voice": {"engine": "espeak", "lead_ms": 0}},
        routes=[{"path": "/chat/completions"},
                {"path": "/audio/chat/completions", "audio": "voice"}],
    )


@pytest.fixture
async def tab(browser, playground_gateway):
    """A page, closed before its gateway is (the live view's stream would hold it open)."""
    tab = await browser.tab()
    yield tab
    await tab.close()


async def download(page) -> bytes:
    """The turn's WAV, as the browser downloads it from its link."""
    async with page.expect_download() as info:
        await page.click(".turn a.wav")
    return (await (await info.value).path()).read_bytes()


async def open_playground(tab: Tab, gateway) -> None:
    await tab.goto(str(gateway.make_url("/playground")))
    await tab.fill("#key", API_KEY)
    await tab.click("#use-key")
    await tab.wait_for_function("() => document.querySelectorAll('#route option').length === 2")
    await tab.wait_for_function(
        "() => document.getElementById('live-state').textContent === 'listening'")


async def say(tab: Tab, text: str, model: str, route: str = "/chat/completions",
              button: str = "#send") -> None:
    chosen = await tab.evaluate(
        """(path) => {
            const select = document.getElementById('route');
            for (const option of select.options) {
                if (option.textContent.startsWith(path + ' ')) {
                    select.value = option.value;
                    select.dispatchEvent(new Event('change'));
                    return true;
                }
            }
            return false;
        }""", route)
    assert chosen, route
    await tab.fill("#model", model)
    await tab.fill("#input", text)
    await tab.click(button)


def sent(tab: Tab) -> list[dict]:
    """The bodies of the turns the page sent."""
    return [json.loads(r["body"]) for r in tab.requests
            if r["method"] == "POST" and r["url"].endswith("/chat/completions")]


async def stats(tab: Tab) -> dict:
    return await tab.evaluate("({...window.llmgatePlayground})")


async def idle(tab: Tab, turns: int) -> None:
    """Until `turns` turns were sent and none streams."""
    await tab.wait_for_function(
        f"() => window.llmgatePlayground.turns === {turns} && "
        "document.getElementById('barge-in').disabled", timeout=15_000)


@espeak
async def test_a_turn_on_an_audio_route_is_heard_and_drawn(tab, playground_gateway, tmp_path):
    await open_playground(tab, playground_gateway)
    await say(tab, "Hi there", "text", route="/audio/chat/completions")
    await tab.wait_for_function("() => window.llmgatePlayground.samples > 0")
    counts = []
    while not await tab.evaluate("document.getElementById('barge-in').disabled"):
        counts.append((await stats(tab))["samples"])
        await asyncio.sleep(0.05)
    await idle(tab, 1)
    got = await stats(tab)
    counts.append(got["samples"])
    # decoded as the frames come (paced at real time), not all at the end
    assert len(set(counts)) >= 3 and counts == sorted(counts)
    assert got["samples"] / 16000 > 0.5  # PCM16 at the route's 16 kHz
    assert got["lastText"] == "Hello there, h\u00e9llo!"  # the transcript
    assert "Hello there" in await tab.text_content(".turn .answer")
    assert got["bars"] >= 8  # the server's marks and the browser's
    labels = await tab.eval_on_selector_all(".turn .waterfall .label",
                                            "ls => ls.map(l => l.textContent)")
    assert {"first audio", "first sentence", "done", "first audio played"} <= set(labels)
    href = await tab.get_attribute(".turn a.wav", "href")
    assert href.startswith("blob:")
    wav = await tab.browser.run(download(tab.page))
    assert wav[:4] == b"RIFF" and wav[8:16] == b"WAVEfmt " and wav[36:40] == b"data"
    assert int.from_bytes(wav[24:28], "little") == 16000  # the route's rate
    assert len(wav) == 44 + 2 * got["samples"] == 44 + int.from_bytes(wav[40:44], "little")
    # shaped as Agora's engine sends a turn, with the clock asked for
    [request] = [r for r in tab.requests if r["method"] == "POST"]
    assert request["headers"]["x-llmgate-timing"] == "1"
    assert request["headers"]["authorization"] == f"Bearer {API_KEY}"
    [body] = sent(tab)
    assert body["stream"] is True and body["model"] == "text"
    channel = await tab.text_content("#channel")
    assert body["context"] == {"appId": "playground", "channel": channel, "userId": "1001"}
    system, user = body["messages"]
    assert system["role"] == "system" and user["role"] == "user"
    assert user["turn_id"] == 0 and isinstance(user["timestamp"], int)
    assert user["content"] == "Hi there"
    assert not tab.errors and not [c for c in tab.console if "Content Security Policy" in c]
    shot = tmp_path / "playground.png"
    await tab.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


async def test_barge_in_closes_the_upstream_request(tab, playground_gateway, upstream, caplog):
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    await open_playground(tab, playground_gateway)
    await say(tab, "Tell me a story", "slow-words")  # a chunk every 100 ms
    await tab.wait_for_function("() => window.llmgatePlayground.lastText.length > 0")
    await tab.click("#barge-in")
    await eventually(lambda: upstream.cancelled == 1)
    assert upstream.finished == 0
    await eventually(lambda: [r.turn["status"] for r in caplog.records
                              if r.name == "llmgate.turn"] == [499])
    await idle(tab, 1)
    heard = (await stats(tab))["lastText"]
    assert heard and "Hello there, h\u00e9llo \U0001f44b!".startswith(heard)
    assert heard != "Hello there, h\u00e9llo \U0001f44b!"  # cut mid-answer
    # the next turn's history holds what was heard, as the assistant's message
    await say(tab, "Go on", "text")
    await idle(tab, 2)
    _, user, assistant, again = sent(tab)[1]["messages"]
    assert (user["turn_id"], assistant["turn_id"], again["turn_id"]) == (0, 0, 1)
    assert assistant == {**assistant, "role": "assistant", "content": heard.strip()}
    assert upstream.requests[-1]["messages"][2]["content"] == heard.strip()


async def test_interrupt_supersedes_the_older_turn(tab, playground_gateway, upstream, caplog):
    caplog.set_level(logging.INFO, logger="llmgate.turn")
    await open_playground(tab, playground_gateway)
    await say(tab, "Tell me a story", "stall-mid")  # two chunks, then nothing
    await tab.wait_for_function("() => window.llmgatePlayground.lastText.length > 0")
    await say(tab, "Wait, what?", "text", button="#interrupt")  # while it streams
    await idle(tab, 2)
    await eventually(lambda: upstream.cancelled == 1)
    ends = [(r.turn["status"], r.turn.get("error")) for r in caplog.records
            if r.name == "llmgate.turn"]
    assert sorted(ends, key=str) == [(200, None), (499, "superseded")]
    first, second = sent(tab)
    assert first["context"] == second["context"]  # the same channel
    _, user, heard, newer = second["messages"]
    assert (user["turn_id"], heard["turn_id"], newer["turn_id"]) == (0, 0, 1)
    assert heard["role"] == "assistant" and heard["content"] == "Hello"
    outcomes = await tab.eval_on_selector_all(".turn .outcome", "os => os.map(o => o.textContent)")
    assert outcomes[0].startswith("done") and outcomes[1].startswith("superseded")


async def test_a_models_html_is_shown_as_text(tab, playground_gateway, upstream):
    script = upstream.script
    upstream.script = lambda model, body: (
        text_chunks(model, [EVIL, " and <b>bold</b>"]) if model == "evil" else script(model, body)
    )
    await open_playground(tab, playground_gateway)
    await say(tab, "Say something nasty", "evil")
    await idle(tab, 1)
    assert (await stats(tab))["lastText"] == EVIL + " and <b>bold</b>"
    assert await tab.text_content(".turn .answer") == EVIL + " and <b>bold</b>"
    assert await tab.evaluate("document.querySelectorAll('img, .answer b').length") == 0
    await asyncio.sleep(0.2)  # (an onerror would have fired by now)
    assert tab.dialogs == [] and not tab.errors


async def test_a_turn_sent_by_another_client_is_in_the_live_view(tab, playground_gateway):
    await open_playground(tab, playground_gateway)
    async with aiohttp.ClientSession() as session, session.post(  # as Agora's engine sends it
        playground_gateway.make_url("/v1/chat/completions"), data=agora_body("text", 7, "room-3"),
        headers={**HEADERS, "Content-Type": "application/json"},
    ) as resp:
        await resp.read()
    await tab.wait_for_function("() => window.llmgatePlayground.liveTurns === 1")
    cells = await tab.eval_on_selector_all("#live-rows tr td", "ts => ts.map(t => t.textContent)")
    assert cells[1:5] == ["/chat/completions", "200", "app/room-3", "7"]
    assert float(cells[5]) > 0  # its first token, in ms
    await tab.click("#live-rows tr")
    labels = await tab.eval_on_selector_all("#live-waterfall .label",
                                            "ls => ls.map(l => l.textContent)")
    assert "done" in labels and "first token" in labels
    assert (await stats(tab))["bars"] == len(labels)


async def test_append_sends_two_user_messages_in_a_row(tab, playground_gateway):
    await open_playground(tab, playground_gateway)
    await say(tab, "What's the weather", "text")
    await idle(tab, 1)
    await say(tab, "in Paris?", "text", button="#append")  # as the engine with interruption off
    await idle(tab, 2)
    first, second = sent(tab)
    assert [m["role"] for m in second["messages"]] == ["system", "user", "user"]
    assert [m["turn_id"] for m in second["messages"][1:]] == [0, 1]
    assert second["messages"][1] == first["messages"][1]


async def test_llmgates_tool_rounds_and_filler_are_shown(
    tab, make_gateway, upstream, service  # noqa: F811 (the fixture)
):
    gateway = await make_gateway(
        playground=ON,
        providers={"fake": {"base_url": upstream.url, "idle_timeout_s": 30}},
        tools={"weather": {"kind": "http", "url": service.url + "slow0.3", "parameters": CITY}},
        routes=[{"path": "/chat/completions"}, {
            "path": "/tools/chat/completions", "tools": ["weather"],
            "tool_filler": {"phrases": ["Let me check that for you."], "after_ms": 100},
        }],
    )
    await open_playground(tab, gateway)
    await say(tab, "Weather in Paris?", "use-tools-weather", route="/tools/chat/completions")
    await idle(tab, 1)
    said = await tab.eval_on_selector_all(".turn .answer .said", "s => s.map(x => x.textContent)")
    assert [x.strip() for x in said] == ["fillerLet me check that for you."]  # tag, phrase
    rounds = await tab.text_content(".turn .rounds")
    assert "llmgate's tool round 1: weather ok" in rounds
    assert 'arguments: {"city": "Paris"}' in rounds and "sunny" in rounds  # the clock's detail
    labels = await tab.eval_on_selector_all(".turn .waterfall .label",
                                            "ls => ls.map(l => l.textContent)")
    assert "tool round 1: weather" in labels
