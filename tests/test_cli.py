"""`python -m llmgate`: starts fast, serves, and exits 2 on a bad config."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from llmgate.server.serve import listen


def run(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmgate", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=30,
        **kw,
    )


def test_help_is_useful():
    out = run("--help").stdout
    assert "--config" in out and "--port" in out and "llm.url" in out
    assert "llmgate check" in out and "llmgate kb" in out  # the other commands are named


def test_bad_config_exits_2_naming_the_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[providers.a]\nbase_url = "https://x/v1"\nbogus = 1\n')
    result = run("--config", str(path))
    assert result.returncode == 2
    assert "providers.a.bogus" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_first_run_with_no_key_starts_open_on_loopback_only():
    env = {"LLMGATE_API_KEY": "", "OPENAI_API_KEY": ""}
    result = run("--config", "config.toml", "--check", env=env)
    assert result.returncode == 0, result.stderr
    assert "no caller key is set (LLMGATE_API_KEY unset)" in result.stderr
    for host in ("0.0.0.0", "10.1.2.3", "::"):
        result = run("--config", "config.toml", "--check", "--host", host, env=env)
        assert result.returncode == 2, host
        assert "server.allow_unauthenticated" in result.stderr
        assert "LLMGATE_API_KEY" in result.stderr
    for host in ("::1", "localhost", "127.0.0.2"):
        assert run("--config", "config.toml", "--check", "--host", host, env=env).returncode == 0


def test_allow_unauthenticated_opens_any_host(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[server]\nhost = "0.0.0.0"\nallow_unauthenticated = true\n'
        '[providers.a]\nbase_url = "http://127.0.0.1:9/v1"\n'
    )
    assert run("--config", str(path), "--check").returncode == 0


def test_check_reports_what_it_serves():
    env = {"LLMGATE_API_KEY": "k", "OPENAI_API_KEY": ""}
    result = run("--config", "config.toml", "--check", env=env)
    assert result.returncode == 0, result.stderr
    assert "providers openai" in result.stdout
    assert "OPENAI_API_KEY" in result.stderr  # warned once: requests to it will fail


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("fmt", "uvloop"), [("text", "true"), ("json", "false")])
def test_serves_health_with_port_override(tmp_path, fmt, uvloop):
    port = free_port()
    path = tmp_path / "c.toml"
    path.write_text(
        f'[server]\napi_keys = []\nuvloop = {uvloop}\n[log]\nformat = "{fmt}"\n'
        '[providers.a]\nbase_url = "http://127.0.0.1:9/v1"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmgate", "--config", str(path), "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz") as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "llmgate did not start"
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.02)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "no caller key is set" in err
    assert f"base_url is http://127.0.0.1:{port}/v1" in err  # where to point a client
    assert "Traceback" not in err


def test_port_in_use_is_a_clear_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[server]\napi_keys = []\n[providers.a]\nbase_url = "http://127.0.0.1:9/v1"\n')
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = run("--config", str(path), "--port", str(busy.getsockname()[1]))
    assert result.returncode == 1
    assert "cannot listen" in result.stderr and "Traceback" not in result.stderr


def test_listening_socket_drops_callers_that_acknowledge_nothing():
    sock = listen("127.0.0.1", 0, 12.5)
    try:
        # Accepted connections inherit TCP_USER_TIMEOUT (send_timeout_s) from the listener.
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 12500
    finally:
        sock.close()


def test_a_bracketed_ipv6_host_listens():
    sock = listen("[::1]", 0, 5)
    try:
        assert sock.family == socket.AF_INET6 and sock.getsockname()[0] == "::1"
    finally:
        sock.close()


def test_a_plain_route_process_carries_no_stage_dependencies(tmp_path):
    """A config with plain routes only imports none of what the stages need."""
    config = tmp_path / "c.toml"
    config.write_text(
        '[server]\napi_keys = ["k"]\n[providers.p]\nbase_url = "http://127.0.0.1:9/v1"\n'
        '[[routes]]\npath = "/chat/completions"\n'
    )
    code = (
        "import sys\n"
        "from llmgate import cli, config\n"
        "from llmgate.app import create_app\n"
        f"create_app(config.load({str(config)!r}))\n"
        "heavy = ('numpy', 'soxr', 'jsonschema', 'piper', 'mcp', 'onnxruntime', 'pypdf',\n"
        "         'opentelemetry', 'llmgate.stages.tools', 'llmgate.stages.audio')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
