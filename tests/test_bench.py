"""scripts/bench runs end to end on a tiny scenario set (a smoke test, no timings asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_run_writes_its_report(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=360,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] >= 1
    scenarios = report["scenarios"]
    assert set(scenarios) == {
        "c1", "c50", "paced-c200", "disconnect", "rag", "audio", "tools",
        "alias-c1", "alias-c50", "failover-c1", "plain-rss",
    }
    audio = scenarios.pop("audio")
    assert "piper" in audio
    for engine in audio.values():
        assert engine["first_audio_short_p50_ms"] is not None and engine["rtf"] > 1
        assert engine["max_paced_streams"] == 1
    for name, scenario in scenarios.items():
        assert scenario["llmgate"]["failed"] == 0, name
        assert scenario["direct"]["failed"] == 0, name
        assert scenario["cpu_ms_per_request"] >= 0
    rag = report["scenarios"]["rag"]
    assert rag["retrievals"] > 0 and rag["retrieval_p50_ms"] is not None
    assert rag["ingest_mb_per_s"] > 0
    hang_ups = report["scenarios"]["disconnect"]["llmgate"]
    assert hang_ups["upstream_closed"] == hang_ups["hung_up"] > 0
    assert "scenario" in result.stdout and "llmgate" in result.stdout
    # c1 and c50 also ran through the thin relay, in the same rounds
    for name in ("c1", "c50"):
        scenario = scenarios[name]
        assert scenario["relay"]["failed"] == 0, name
        assert scenario["relay"]["ttft_p50_ms"] is not None, name
        assert scenario["relay_cpu_ms_per_request"] >= 0
        assert scenario["llmgate_minus_relay_ttft_p50_ms"] == round(
            scenario["llmgate"]["ttft_p50_ms"] - scenario["relay"]["ttft_p50_ms"], 3
        )
    assert "relay" not in scenarios["tools"]
    assert "thin aiohttp relay" in result.stdout
    plain = scenarios["plain-rss"]
    assert plain["streams"] > 0
    assert 0 < plain["import_s"] < plain["startup_s"]
    assert 0 < plain["rss_mb_after_200"] <= plain["peak_rss_mb"]
    assert report["llmgate_src"]["path"] == str(ROOT)


def test_bench_src_must_hold_an_llmgate_package(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--src", str(tmp_path), "c1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "no llmgate package there" in result.stderr
