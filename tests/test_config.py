"""config.toml: ${VAR} expansion, unset variables, and errors that name the key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from llmgate.config import ConfigError, is_loopback, load, open_refusal, parse

PROVIDER = {"base_url": "https://api.example.com/v1", "api_key": "${KEY}"}


def with_provider(**sections):
    return {"providers": {"p": dict(PROVIDER)}, **sections}


def test_shipped_config_loads_with_its_variables_set(monkeypatch):
    monkeypatch.setenv("LLMGATE_API_KEY", "k")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    loaded = load("config.toml")
    assert loaded.config.server.api_keys == ["k"]
    assert loaded.config.providers["openai"].api_key == "sk-x"
    assert [r.path for r in loaded.config.routes] == ["/chat/completions"]
    assert loaded.unset_env == {}


def test_variables_expand_with_defaults():
    raw = with_provider(server={"host": "${HOST:-0.0.0.0}", "port": 9000})
    loaded = parse(raw, {"KEY": "secret"})
    assert loaded.config.server.host == "0.0.0.0"
    assert loaded.config.providers["p"].api_key == "secret"


def test_unset_provider_variable_is_a_warning_not_a_crash():
    loaded = parse(with_provider(), {})
    assert loaded.unset_env == {"p": ("KEY",)}
    assert any("KEY" in w for w in loaded.warnings)


def test_unset_api_key_entry_is_dropped_never_empty():
    loaded = parse(with_provider(server={"api_keys": ["${A}", "fixed"]}), {"KEY": "x"})
    assert loaded.config.server.api_keys == ["fixed"]


def test_all_api_keys_unset_is_open_on_loopback_only():
    loaded = parse(with_provider(server={"api_keys": ["${A}"]}), {"KEY": "x"})
    assert loaded.config.server.api_keys == []
    assert any("no caller key is set (A unset)" in w for w in loaded.warnings)
    assert open_refusal(loaded.config.server, "127.0.0.1") is None
    refusal = open_refusal(loaded.config.server, "0.0.0.0")
    assert refusal is not None and "server.allow_unauthenticated" in refusal
    assert is_loopback("::ffff:127.0.0.1") and is_loopback("::1") and not is_loopback("::")
    loaded = parse(with_provider(server={"api_keys": [], "allow_unauthenticated": True}), {})
    assert open_refusal(loaded.config.server, "0.0.0.0") is None


def test_empty_api_keys_runs_open_with_a_warning():
    loaded = parse(with_provider(server={"api_keys": []}), {"KEY": "x"})
    assert any("no caller key is set: requests need no key" in w for w in loaded.warnings)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (with_provider(server={"prot": 1}), "server.prot"),
        (with_provider(server={"port": "80"}), "server.port"),
        (with_provider(server={"port": 70000}), "server.port"),
        ({"providers": {"p": {**PROVIDER, "base_url": "api.example.com"}}}, "providers.p.base_url"),
        ({"providers": {"p": {**PROVIDER, "base_url": "ftp://x"}}}, "providers.p.base_url"),
        ({"providers": {"p": {"api_key": "x"}}}, "providers.p.base_url"),
        ({"providers": {"p": {**PROVIDER, "kind": "azure"}}}, "providers.p.kind"),
        ({"providers": {"p": {**PROVIDER, "idle_timeout_s": 0}}}, "providers.p.idle_timeout_s"),
        ({"providers": {}}, "providers"),
        (with_provider(log={"format": "xml"}), "log.format"),
        (with_provider(log={"format": "${FMT}"}), "log.format"),
        (with_provider(routes=[{"path": "chat"}]), "routes[0].path"),
        (with_provider(routes=[{"path": "/a"}, {"path": "/v1/a"}]), "routes[1].path"),
        (with_provider(routes=[{"path": "/v1/models"}]), "routes[0].path"),
    ],
)
def test_mistakes_name_the_key(raw, key):
    with pytest.raises(ConfigError) as info:
        parse(raw, {"KEY": "x"})
    assert str(info.value).startswith(f"{key}:")


def test_error_never_shows_a_secret():
    raw = {"providers": {"p": {**PROVIDER, "base_url": "nope", "api_key": "${KEY}"}}}
    with pytest.raises(ConfigError) as info:
        parse(raw, {"KEY": "sk-very-secret"})
    assert "sk-very-secret" not in str(info.value)


def test_unreadable_and_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(str(bad))


def test_speech_option_true_or_a_table():
    routes = [
        {"path": "/a"},
        {"path": "/b", "speech": True},
        {"path": "/c", "speech": {"urls": "domain", "emoji": False}},
    ]
    a, b, c = parse(with_provider(routes=routes), {"KEY": "x"}).config.routes
    assert a.speech is False and b.speech is True
    assert (c.speech.markdown, c.speech.emoji, c.speech.urls) == (True, False, "domain")


@pytest.mark.parametrize(
    ("speech", "key"),
    [
        ("yes", "routes[0].speech"),
        ({"urls": "say"}, "routes[0].speech.urls"),
        ({"markdwn": True}, "routes[0].speech.markdwn"),
    ],
)
def test_bad_speech_option_names_the_key(speech, key):
    with pytest.raises(ConfigError) as info:
        parse(with_provider(routes=[{"path": "/a", "speech": speech}]), {"KEY": "x"})
    assert str(info.value).startswith(key)


def test_the_readme_config_examples_parse():
    readme = Path("README.md").read_text()
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", readme, re.S) if "[[routes]]" in b]
    assert len(blocks) >= 3
    env = {"KEY": "x", "LLMGATE_API_KEY": "k", "OPENAI_API_KEY": "sk-x", "WEATHER_KEY": "w"}
    for block in blocks:
        raw = tomllib.loads(block)
        raw.setdefault("providers", {"p": dict(PROVIDER)})
        parse(raw, env)


def test_a_rag_route_must_name_its_sections():
    with pytest.raises(ConfigError, match=r"^routes\[0\]\.rag: no \[rag\.x\]"):
        parse(with_provider(routes=[{"path": "/r", "rag": "x"}]), {"KEY": "x"})
    with pytest.raises(ConfigError, match=r"^rag\.r\.kb: no \[kb\.k\]"):
        parse(with_provider(rag={"r": {"kb": "k"}}), {"KEY": "x"})
    with pytest.raises(ConfigError, match=r"^rag\.r\.top_k"):
        parse(with_provider(kb={"k": {"path": "a"}}, rag={"r": {"kb": "k", "top_k": 0}}),
              {"KEY": "x"})


def test_kb_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "c.toml").write_text(
        '[providers.a]\nbase_url = "http://x/v1"\n[kb.d]\npath = "kb/d.sqlite"\n'
    )
    loaded = load(str(tmp_path / "c.toml"))
    assert loaded.path(loaded.config.kb["d"].path) == tmp_path / "kb" / "d.sqlite"


@pytest.mark.parametrize(
    ("kb", "message"),
    [
        ({}, "kb.k.path: a sqlite knowledge base needs"),
        ({"kind": "http"}, "kb.k.url: expected a URL"),
        ({"kind": "http", "url": "ftp://x"}, "kb.k.url: expected a URL"),
        ({"kind": "vector"}, "kb.k.kind"),
    ],
)
def test_a_kb_section_says_what_it_lacks(kb, message):
    with pytest.raises(ConfigError) as info:
        parse(with_provider(kb={"k": kb}), {"KEY": "x"})
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("models", "key"),
    [
        ({"fast": ["nope/gpt"]}, "models.fast[0]"),
        ({"fast": ["p/gpt", "p/"]}, "models.fast[1]"),
        ({"fast": []}, "models.fast"),
        ({"fast": {"targets": ["q/x"]}}, "models.fast.targets[0]"),
        ({"fast": {"targets": ["p/x"], "hedge_after_ms": 0}}, "models.fast.hedge_after_ms"),
        ({"fast": {"targets": ["p/x"], "hedge": 5}}, "models.fast.hedge"),
    ],
)
def test_alias_mistakes_name_the_key(models, key):
    with pytest.raises(ConfigError) as info:
        parse(with_provider(models=models), {"KEY": "x"})
    assert str(info.value).startswith(f"{key}:"), info.value


def test_aliases_as_a_list_or_a_table():
    models = {"fast": ["p/a", "b"], "smart": {"targets": ["p/c"], "hedge_after_ms": 600}}
    config = parse(with_provider(models=models), {"KEY": "x"}).config
    assert config.models["fast"].targets == ["p/a", "b"]
    assert config.models["fast"].hedge_after_ms is None
    assert config.models["smart"].hedge_after_ms == 600


@pytest.mark.parametrize(
    ("server", "key"),
    [
        ({"on_stream_error": "silence"}, "server.on_stream_error"),
        ({"apology": ""}, "server.apology"),
        ({"limits": {"max_concurrent": 0}}, "server.limits.max_concurrent"),
        ({"keys": [{"key": "k"}]}, "server.keys[0].name"),
        ({"keys": [{"key": "", "name": "a"}]}, "server.keys[0].key"),
    ],
)
def test_resilience_server_mistakes_name_the_key(server, key):
    with pytest.raises(ConfigError) as info:
        parse(with_provider(server=server), {"KEY": "x"})
    assert str(info.value).startswith(f"{key}"), info.value
