"""`python -m llmgate check`: every probe against real servers on 127.0.0.1, no internet."""

from __future__ import annotations

import asyncio
import re
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from llmgate.check import main
from llmgate.kb.chunking import Chunk
from llmgate.kb.store import Store
from tests.fake_upstream import CREATED
from tests.test_mcp import ServerThread, free_port

SECRET = "sk-live-abcdef1234567890"


async def check(capsys: pytest.CaptureFixture[str], config: Path, *extra: str) -> tuple[int, str]:
    """main() on a thread of its own: it runs its own event loop while this test's loop
    keeps serving the fake servers."""
    code = await asyncio.to_thread(main, ["--config", str(config), *extra])
    return code, capsys.readouterr().out


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def row(out: str, what: str) -> tuple[str, str]:
    """(status, detail) of the table's row for `what`."""
    for line in out.splitlines():
        parts = re.split(r"\s{2,}", line, maxsplit=2)
        if parts[0] == what:
            return parts[1], parts[2] if len(parts) > 2 else ""
    raise AssertionError(f"no row {what!r} in:\n{out}")


def provider(name: str, url: str, api_key: str = "upstream-secret", extra: str = "") -> str:
    return f'[providers.{name}]\nbase_url = "{url}"\napi_key = "{api_key}"\n{extra}\n'


class NoModels:
    """An OpenAI-compatible server without GET /models (it answers 404, as some do), whose
    chat completions want a key."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.chat)

    async def chat(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        self.auth.append(request.headers.get("Authorization"))
        if not request.headers.get("Authorization"):
            error = {"message": "You didn't provide an API key.", "type": "invalid_request_error"}
            return web.json_response({"error": error}, status=401)
        message = {"role": "assistant", "content": "ok"}
        choice = {"index": 0, "finish_reason": "length", "message": message}
        return web.json_response(
            {"id": "x", "object": "chat.completion", "created": CREATED, "choices": [choice]}
        )


@pytest.fixture
async def no_models(aiohttp_server) -> NoModels:
    fake = NoModels()
    server = await aiohttp_server(fake.app)
    fake.url = str(server.make_url("/v1"))  # type: ignore[attr-defined]
    return fake


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[ServerThread]:
    server = ServerThread().start()
    yield server
    server.stop()


# -- providers -------------------------------------------------------------------------------


async def test_a_good_config_prints_a_table_and_exits_0(tmp_path, capsys, upstream):
    code, out = await check(capsys, write(tmp_path, provider("fake", upstream.url)))
    assert code == 0, out
    header, line = out.splitlines()
    assert re.split(r"\s+", header) == ["what", "status", "detail"]
    assert header.index("status") == line.index("ok") and header.index("detail") > 0
    status, detail = row(out, "provider fake")
    assert status == "ok"
    assert re.fullmatch(r"\d+ ms; lists 2 models", detail)  # text, markdown: a repeat once
    assert upstream.model_lists == 1 and upstream.requests == []  # nothing was generated


async def test_a_rejected_key_fails_without_showing_it(tmp_path, capsys, upstream):
    upstream.fail_with = 401  # and its message quotes a key
    code, out = await check(capsys, write(tmp_path, provider("fake", upstream.url, SECRET)))
    assert code == 1
    status, detail = row(out, "provider fake")
    assert status == "FAIL"
    assert "rejected llmgate's credentials" in detail and "HTTP 401" in detail
    assert SECRET not in out and "sk-" not in out and "abcdef" not in out


async def test_a_refused_connection_fails(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/v1"
    code, out = await check(capsys, write(tmp_path, provider("gone", url)))
    assert code == 1
    assert row(out, "provider gone")[0] == "FAIL"
    assert row(out, "provider gone")[1].endswith("provider 'gone' could not be reached")
    assert "Traceback" not in out


async def test_an_unset_variable_fails_naming_it_and_nothing_is_asked(
    tmp_path, capsys, upstream, monkeypatch
):
    monkeypatch.delenv("LLMGATE_CHECK_UNSET", raising=False)
    config = provider("fake", upstream.url, "${LLMGATE_CHECK_UNSET}")
    code, out = await check(capsys, write(tmp_path, config))
    assert code == 1
    assert row(out, "provider fake") == (
        "FAIL", "environment variable LLMGATE_CHECK_UNSET is not set"
    )
    assert upstream.model_lists == 0


async def test_no_models_list_falls_back_to_a_one_token_completion(tmp_path, capsys, no_models):
    config = provider("sparse", no_models.url, SECRET, 'default_model = "tiny"')
    config += provider("bare", no_models.url)  # nothing to ask for
    code, out = await check(capsys, write(tmp_path, config))
    assert code == 0, out
    status, detail = row(out, "provider sparse")
    assert status == "ok" and "no /models (HTTP 404)" in detail and "of tiny answered" in detail
    [body] = no_models.bodies
    assert (body["model"], body["max_tokens"], body["stream"]) == ("tiny", 1, False)
    assert no_models.auth == [f"Bearer {SECRET}"] and SECRET not in out
    status, detail = row(out, "provider bare")
    assert status == "skip" and "no default_model or models" in detail


async def test_a_passthrough_provider_is_asked_without_a_key(
    tmp_path, capsys, upstream, no_models
):
    upstream.fail_with = 401
    config = provider("relay", upstream.url, "passthrough")
    config += provider("sparse", no_models.url, "passthrough", 'models = ["m1", "m2"]')
    code, out = await check(capsys, write(tmp_path, config))
    assert code == 0, out
    for what in ("provider relay", "provider sparse"):
        status, detail = row(out, what)
        assert status == "ok" and "passthrough: callers bring their own key" in detail
    assert no_models.auth == [None] and no_models.bodies[0]["model"] == "m1"


async def test_probes_run_at_once_each_bounded_by_the_timeout(tmp_path, capsys, aiohttp_server):
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"data": []})

    app = web.Application()
    app.router.add_get("/v1/models", hang)
    server = await aiohttp_server(app)
    url = str(server.make_url("/v1"))
    config = "".join(provider(f"slow{i}", url) for i in range(4))
    try:
        start = time.perf_counter()
        code, out = await check(capsys, write(tmp_path, config), "--timeout", "0.4")
        elapsed = time.perf_counter() - start
    finally:
        release.set()
    assert code == 1
    for i in range(4):
        assert row(out, f"provider slow{i}") == ("FAIL", row(out, f"provider slow{i}")[1])
        assert row(out, f"provider slow{i}")[1].endswith("no answer within 0.4 s")
    assert elapsed < 1.2  # one after the other would take 1.6 s


# -- tools -----------------------------------------------------------------------------------


async def test_an_http_tool_is_reached_and_never_called(tmp_path, capsys, aiohttp_server):
    calls = []

    async def tool(request: web.Request) -> web.Response:
        calls.append(await request.read())
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/weather", tool)
    server = await aiohttp_server(app)
    dead = f"http://127.0.0.1:{free_port()}/x?key=sekrit-in-url"
    config = provider("p", f"http://127.0.0.1:{free_port()}/v1") + f"""
[tools.weather]
kind = "http"
url = "{server.make_url('/weather')}"
[tools.gone]
kind = "http"
url = "{dead}"
[tools.spare]
kind = "http"
url = "{dead}"
[[routes]]
path = "/chat/completions"
tools = ["weather", "gone"]
"""
    code, out = await check(capsys, write(tmp_path, config))
    assert code == 1
    status, detail = row(out, "tool weather")
    assert status == "ok" and "reachable (HTTP 405 to HEAD)" in detail
    assert calls == []  # no made-up arguments were sent
    status, detail = row(out, "tool gone")
    assert status == "FAIL" and "could not be reached" in detail
    assert row(out, "tool spare") == ("skip", "no route uses it")
    assert "sekrit" not in out


async def test_mcp_servers_list_their_tools_or_say_why_not(tmp_path, capsys, mcp_server):
    config = provider("p", f"http://127.0.0.1:{free_port()}/v1") + f"""
[tools.crm]
kind = "mcp"
url = "{mcp_server.url}"
[tools.picky]
kind = "mcp"
url = "{mcp_server.url}"
allowed = ["echo", "nope"]
[tools.dead]
kind = "mcp"
url = "http://127.0.0.1:{free_port()}/mcp"
headers = {{ Authorization = "Bearer mcp-sekrit" }}
[[routes]]
path = "/chat/completions"
tools = ["crm", "picky", "dead"]
"""
    code, out = await check(capsys, write(tmp_path, config))
    assert code == 1
    status, detail = row(out, "tool crm")
    assert status == "ok"
    assert detail.endswith("lists 5 tools: echo, fail, nap, whoami, big")
    status, detail = row(out, "tool picky")
    assert status == "FAIL" and "does not offer nope; lists 1 tool: echo" in detail
    status, detail = row(out, "tool dead")
    assert status == "FAIL" and "ConnectError" in detail
    assert "mcp-sekrit" not in out


# -- knowledge bases -------------------------------------------------------------------------


async def test_sqlite_knowledge_bases_are_counted_or_said_to_be_missing(tmp_path, capsys):
    store = Store(tmp_path / "docs.sqlite")
    with store.transaction():
        store.replace("a.md", "h", 40, [Chunk("Intro", "llmgate checks"), Chunk("B", "more")])
    store.close()
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    half = sqlite3.connect(tmp_path / "half.sqlite")  # its sources, but no search index
    half.executescript(
        "CREATE TABLE sources (path, hash, bytes, chunks, ingested);"
        "INSERT INTO sources VALUES ('a.md', 'h', 4, 1, 0);"
    )
    half.close()
    config = provider("p", f"http://127.0.0.1:{free_port()}/v1") + """
[kb.docs]
path = "docs.sqlite"
[kb.gone]
path = "gone.sqlite"
[kb.junk]
path = "junk.sqlite"
[kb.half]
path = "half.sqlite"
"""
    path = write(tmp_path, config)
    code, out = await check(capsys, path)
    assert code == 1
    status, detail = row(out, "kb docs")
    assert status == "ok" and detail.endswith("2 chunks from 1 source")
    status, detail = row(out, "kb gone")
    assert status == "FAIL" and "gone.sqlite does not exist" in detail
    assert f"python -m llmgate kb ingest --config {path} --kb gone" in detail
    assert not (tmp_path / "gone.sqlite").exists()  # opened read-only: nothing made
    status, detail = row(out, "kb junk")
    assert status == "FAIL" and "not a knowledge base" in detail
    status, detail = row(out, "kb half")
    assert status == "FAIL" and "not a knowledge base (no such table: chunks_fts)" in detail


async def test_an_http_knowledge_base_answers_one_retrieval(tmp_path, capsys, aiohttp_server):
    asked = []

    async def retrieve(request: web.Request) -> web.Response:
        asked.append(await request.json())
        if request.path == "/broken":
            return web.json_response({"error": "down"}, status=500)
        return web.json_response({"passages": [{"text": "llmgate is a gateway"}]})

    app = web.Application()
    app.router.add_post("/search", retrieve)
    app.router.add_post("/broken", retrieve)
    server = await aiohttp_server(app)
    config = provider("p", f"http://127.0.0.1:{free_port()}/v1") + f"""
[kb.remote]
kind = "http"
url = "{server.make_url('/search')}"
[kb.broken]
kind = "http"
url = "{server.make_url('/broken')}"
"""
    code, out = await check(capsys, write(tmp_path, config))
    assert code == 1
    status, detail = row(out, "kb remote")
    assert status == "ok" and "one retrieval answered (1 passage)" in detail
    status, detail = row(out, "kb broken")
    assert status == "FAIL" and "the retrieval service answered HTTP 500" in detail
    assert {a["query"] for a in asked} == {"llmgate check"}


# -- audio -----------------------------------------------------------------------------------


def pcm_bytes(detail: str) -> int:
    found = re.search(r"\((\d+) bytes of PCM16 at (\d+) Hz\)", detail)
    assert found, detail
    return int(found.group(1))


async def test_piper_speaks_a_phrase_and_a_missing_voice_fails(tmp_path, capsys):
    config = provider("p", f"http://127.0.0.1:{free_port()}/v1") + """
[audio.voice]
[audio.lost]
voice = "voices/nope.onnx"
"""
    code, out = await check(capsys, write(tmp_path, config), "--timeout", "20")
    status, detail = row(out, "audio voice")
    assert status == "ok" and detail.startswith(tuple("0123456789")) and "piper" in detail
    assert pcm_bytes(detail) > 44100  # a six-word phrase: over a second at 22.05 kHz
    status, detail = row(out, "audio lost")
    assert status == "FAIL" and "nope.onnx: no such file" in detail
    assert code == 1


async def test_a_file_engine_plays_all_of_its_file(tmp_path, capsys):
    (tmp_path / "closed.pcm").write_bytes(b"\x01\x00" * 100_000)  # 4 reads of it
    (tmp_path / "empty.pcm").write_bytes(b"")
    config = provider("p", f"http://127.0.0.1:{free_port()}/v1") + """
[audio.canned]
engine = "file"
pcm_file = "closed.pcm"
file_rate = 8000
[audio.lost]
engine = "file"
pcm_file = "gone.pcm"
[audio.silent]
engine = "file"
pcm_file = "empty.pcm"
"""
    code, out = await check(capsys, write(tmp_path, config))
    status, detail = row(out, "audio canned")
    assert status == "ok" and detail.endswith("(200000 bytes of PCM16 at 8000 Hz)")
    status, detail = row(out, "audio lost")
    assert status == "FAIL" and "gone.pcm: cannot read" in detail
    status, detail = row(out, "audio silent")
    assert status == "FAIL" and detail.endswith("file spoke no audio")
    assert code == 1


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
async def test_espeak_speaks_a_phrase(tmp_path, capsys):
    config = provider("p", f"http://127.0.0.1:{free_port()}/v1") + """
[audio.robot]
engine = "espeak"
"""
    code, out = await check(capsys, write(tmp_path, config))
    status, detail = row(out, "audio robot")
    assert status == "ok" and "espeak" in detail and pcm_bytes(detail) > 44100
    assert code == 1  # the provider on a free port: only the audio row is ok


# -- the config itself -----------------------------------------------------------------------


async def test_a_config_error_exits_2_naming_the_key(tmp_path, capsys):
    path = write(tmp_path, '[providers.a]\nbase_url = "https://x/v1"\nbogus = 1\n')
    code, out = await check(capsys, path)
    assert code == 2
    assert out.strip() == "config: providers.a.bogus: is not a known field"
    code, out = await check(capsys, tmp_path / "none.toml")
    assert code == 2 and out.startswith("config: ") and "cannot read" in out


async def test_the_first_run_rule_is_applied_as_serving_does(tmp_path, capsys):
    # no caller key on an address others can reach: serving refuses it, so check does too
    path = write(tmp_path, '[server]\nhost = "0.0.0.0"\n[providers.a]\nbase_url = "https://x/v1"\n')
    code, out = await check(capsys, path)
    assert code == 2 and "server.api_keys" in out and "0.0.0.0" in out


def test_a_bad_timeout_is_a_usage_error(capsys):
    assert main(["--timeout", "0"]) == 2
    assert "seconds above 0" in capsys.readouterr().err
