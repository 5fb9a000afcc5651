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
        "alias-c1", "alias-c50", "failover-c1",
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
