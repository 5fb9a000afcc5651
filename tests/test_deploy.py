"""scripts/llmgate.service: systemd knows every directive, and it runs llmgate as the README says.

The file is read by a small parser of our own (keys may repeat; configparser would merge
them); where systemd-analyze exists, `systemd-analyze verify` reads it as well.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmgate.config import ServerConfig

UNIT = Path(__file__).resolve().parent.parent / "scripts" / "llmgate.service"

# The directive names the unit may use, per section: a name systemd does not know (a typo
# like `ProtectSytem`) is ignored by systemd with only a warning, so it fails here.
KNOWN = {
    "Unit": {"Description", "Documentation", "After", "Wants", "Requires", "Before"},
    "Service": {
        "Type", "User", "Group", "WorkingDirectory", "EnvironmentFile", "Environment",
        "ExecStart", "ExecReload", "SyslogIdentifier", "KillSignal", "KillMode",
        "TimeoutStopSec", "Restart", "RestartSec", "RestartPreventExitStatus", "LimitNOFILE",
        "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
        "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
        "ProtectControlGroups", "ProtectClock", "ProtectHostname", "StateDirectory",
        "StateDirectoryMode", "ReadWritePaths", "UMask", "RestrictAddressFamilies",
        "RestrictNamespaces", "RestrictSUIDSGID", "LockPersonality", "RestrictRealtime",
        "SystemCallArchitectures", "CapabilityBoundingSet",
    },
    "Install": {"WantedBy"},
}
# Keys systemd accumulates when repeated; any other key twice is a mistake (the last wins).
REPEATABLE = {"After", "Wants", "Requires", "Before", "Environment", "EnvironmentFile",
              "ReadWritePaths", "WantedBy", "Documentation"}

EXPECTED = {
    ("Unit", "After"): "network-online.target",
    ("Unit", "Wants"): "network-online.target",
    ("Service", "User"): "llmgate",
    ("Service", "Group"): "llmgate",
    ("Service", "WorkingDirectory"): "/opt/llmgate",
    ("Service", "EnvironmentFile"): "/etc/llmgate/llmgate.env",
    ("Service", "Restart"): "on-failure",
    ("Service", "RestartSec"): "2",
    ("Service", "KillSignal"): "SIGTERM",
    ("Service", "LimitNOFILE"): "65536",
    ("Service", "NoNewPrivileges"): "yes",
    ("Service", "ProtectSystem"): "strict",
    ("Service", "ProtectHome"): "yes",
    ("Service", "PrivateTmp"): "yes",
    ("Service", "PrivateDevices"): "yes",
    ("Service", "ProtectKernelTunables"): "yes",
    ("Service", "ProtectKernelModules"): "yes",
    ("Service", "ProtectControlGroups"): "yes",
    ("Service", "RestrictAddressFamilies"): "AF_INET AF_INET6 AF_UNIX",
    ("Service", "LockPersonality"): "yes",
    ("Service", "RestrictRealtime"): "yes",
    ("Service", "SystemCallArchitectures"): "native",
    ("Service", "CapabilityBoundingSet"): "",
    ("Install", "WantedBy"): "multi-user.target",
}

# What systemd-analyze prints for a unit it cannot read as written (it still exits 0).
BROKEN = re.compile(
    r"Unknown key|Unknown section|Unknown lvalue|Invalid|Failed to parse|Missing '='"
    r"|not executable|Assignment outside of section|bad unit file setting",
    re.IGNORECASE,
)


def parse(text: str) -> dict[str, list[tuple[int, str, str]]]:
    """{section: [(line number, key, value), ...]} in file order, as systemd reads it."""
    sections: dict[str, list[tuple[int, str, str]]] = {}
    current: str | None = None
    lines = iter(enumerate(text.splitlines(), 1))
    for number, raw in lines:
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            assert current not in sections, f"line {number}: [{current}] twice"
            sections[current] = []
            continue
        while line.endswith("\\"):  # a continued line
            line = line[:-1] + " " + next(lines)[1].strip()
        assert current is not None, f"line {number}: {line!r} is outside any section"
        key, eq, value = line.partition("=")
        assert eq, f"line {number}: {line!r} is not KEY=VALUE"
        sections[current].append((number, key.strip(), value.strip()))
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, list[tuple[int, str, str]]]:
    return parse(UNIT.read_text())


def values(unit, section: str, key: str) -> list[str]:
    return [value for _, k, value in unit.get(section, []) if k == key]


def one(unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}: expected once, found {found}"
    return found[0]


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min)?", value)
    assert match, f"not a simple time span: {value!r}"
    return float(match[1]) * (60 if match[2] == "min" else 1)


def test_sections(unit):
    assert list(unit) == ["Unit", "Service", "Install"]


def test_every_directive_is_one_systemd_knows(unit):
    for section, entries in unit.items():
        seen: set[str] = set()
        for number, key, _ in entries:
            known = KNOWN.get(section, set())
            assert key in known, f"line {number}: [{section}] has no directive {key!r}"
            assert key in REPEATABLE or key not in seen, f"line {number}: {key} set twice"
            seen.add(key)


@pytest.mark.parametrize(("where", "expected"), EXPECTED.items(), ids=lambda v: str(v))
def test_directive_value(unit, where, expected):
    section, key = where
    assert one(unit, section, key) == expected


def test_runs_llmgate_on_the_etc_config(unit):
    argv = one(unit, "Service", "ExecStart").split()
    assert argv[0] == "/opt/llmgate/.venv/bin/python"
    assert argv[1:] == ["-m", "llmgate", "--config", "/etc/llmgate/config.toml"]


def test_reload_sends_sighup_to_the_main_process(unit):
    argv = one(unit, "Service", "ExecReload").split()
    assert argv[0].endswith("/kill") and argv[0].startswith("/")
    assert argv[1] in ("-HUP", "-SIGHUP", "-1") and argv[2] == "$MAINPID"


def test_stop_waits_out_the_drain(unit):
    drain_s = getattr(ServerConfig(), "drain_s", 20.0)
    assert seconds(one(unit, "Service", "TimeoutStopSec")) > drain_s
    # SIGTERM to the main process only; the rest of the group is killed at the timeout
    assert values(unit, "Service", "KillMode") in ([], ["mixed"], ["control-group"])


def test_the_knowledge_base_folder_is_writable(unit):
    state = values(unit, "Service", "StateDirectory")
    paths = " ".join(values(unit, "Service", "ReadWritePaths")).split()
    assert state == ["llmgate"] or "/var/lib/llmgate" in paths
    assert "yes" not in values(unit, "Service", "DynamicUser")


def test_onnxruntime_may_map_executable_memory(unit):
    # piper's onnxruntime: MemoryDenyWriteExecute=yes would break the audio route
    assert values(unit, "Service", "MemoryDenyWriteExecute") in ([], ["no"])


def test_parser_catches_a_typo():
    broken = parse(UNIT.read_text().replace("ProtectSystem=", "ProtectSytem="))
    names = {key for _, key, _ in broken["Service"]}
    assert "ProtectSytem" in names and not names <= KNOWN["Service"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart's binary exists: point it at this interpreter
    text = UNIT.read_text()
    assert "ExecStart=/opt/llmgate/.venv/bin/python " in text
    copy = tmp_path / "llmgate.service"
    copy.write_text(text.replace("ExecStart=/opt/llmgate/.venv/bin/python ",
                                 f"ExecStart={sys.executable} "))
    done = subprocess.run(
        ["systemd-analyze", "--man=no", "verify", str(copy)],
        capture_output=True, text=True, timeout=60,
    )
    out = (done.stdout + done.stderr).strip()
    assert not BROKEN.search(out), out
    if done.returncode != 0:
        # tolerated: this machine has no llmgate user and no /etc/llmgate/llmgate.env
        lines = [line for line in out.splitlines() if line.strip()]
        assert all(re.search(r"llmgate\.env|user|group", line, re.I) for line in lines), out
