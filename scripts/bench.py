"""llmgate's benchmark: the same load straight to a mock upstream and through llmgate.

Three processes: the mock upstream (scripts/bench_mock.py), llmgate, and the load driver
(scripts/bench_load.py). Each scenario runs direct first, then through llmgate, so the
difference is llmgate's; llmgate's CPU time and RSS are read from /proc around each run.
c1 and c50 also run through a thin aiohttp relay (scripts/bench_relay.py) in the same
rounds: "llmgate minus relay" is what llmgate adds over any aiohttp proxy. plain-rss starts
a second llmgate with only a plain route: its start-up, import time and RSS after 200 streams.
--src PATH (or LLMGATE_SRC) runs llmgate from another source tree, e.g. a worktree of main.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import itertools
import json
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
TICK = os.sysconf("SC_CLK_TCK")

# name -> load driver options; "quick" shrinks each for the test suite's smoke run.
SCENARIOS: dict[str, dict] = {
    "c1": {"requests": 1000, "concurrency": 1, "chunks": 20, "warmup": 20, "rounds": 3},
    "c50": {"requests": 5000, "concurrency": 50, "chunks": 20, "warmup": 2, "rounds": 2},
    # Real calls do not start in lockstep: workers' first requests spread over one stream's length.
    "paced-c200": {
        "requests": 1000,
        "concurrency": 200,
        "chunks": 20,
        "gap_ms": 20,
        "warmup": 1,
        "stagger_ms": 400,
    },
    "disconnect": {
        "requests": 500,
        "concurrency": 500,
        "chunks": 1000,
        "gap_ms": 20,
        "hang_up": True,
    },
    # The RAG route over a 100,000-chunk knowledge base, a different question each time:
    # ttft is the waiting phrase (after_ms = 0); retrieval time comes from the turn lines.
    "rag": {"requests": 400, "concurrency": 1, "chunks": 20, "warmup": 20, "rounds": 2},
    # The same over real text that ships with Python and Debian (real_docs), questions made
    # of its own lines; named only (not in the default run: a longer build).
    "rag-real": {"requests": 400, "concurrency": 1, "chunks": 20, "warmup": 20, "rounds": 2},
    # Each speech engine through an audio route (scripts/bench_audio.py: its own upstream
    # of real sentences): first audio, real-time factor, paced streams held.
    "audio": {},
    # c1 on a tools route whose tool the model never calls: what the tools stage costs an
    # answer that needs no tool (llmgate's tools offered, every chunk looked at).
    "tools": {"requests": 1000, "concurrency": 1, "chunks": 20, "warmup": 20, "rounds": 2},
    # A second llmgate whose config has only a plain route (no RAG, tools or audio routes):
    # its start-up, `import llmgate.cli`, and RSS after 200 streams, 50 at a time, paced like
    # paced-c200 (a chunk every 20 ms, first requests spread over 400 ms).
    "plain-rss": {
        "requests": 200,
        "concurrency": 50,
        "chunks": 20,
        "gap_ms": 20,
        "stagger_ms": 400,
    },
}
# The plain route through a model alias (config below): one target keeps the byte relay;
# two targets take the failover path (chunks read one by one, headers at the first token).
SCENARIOS["alias-c1"] = {**SCENARIOS["c1"], "model_prefix": "one-"}
SCENARIOS["alias-c50"] = {**SCENARIOS["c50"], "model_prefix": "one-"}
SCENARIOS["failover-c1"] = {**SCENARIOS["c1"], "model_prefix": "two-"}
QUICK = {
    "c1": (30, 1),
    "c50": (100, 10),
    "paced-c200": (40, 20),
    "disconnect": (20, 20),
    "rag": (30, 1),
    "rag-real": (30, 1),
    "audio": (0, 0),
    "tools": (30, 1),
    "alias-c1": (30, 1),
    "alias-c50": (100, 10),
    "failover-c1": (30, 1),
    "plain-rss": (20, 10),
}
# Scenarios also run through the thin relay (scripts/bench_relay.py), in the same rounds.
RELAYED = {"c1", "c50"}
STARTS, STARTS_QUICK = 3, 1  # plain-rss: start-up and import times are the best of these
KB_CHUNKS, KB_CHUNKS_QUICK = 100_000, 1_000
REAL_KB_MB, REAL_KB_MB_QUICK, REAL_CHANGELOG_KB = 10.0, 0.5, 16
RAG_PATHS = {"rag": "/rag/chat/completions", "rag-real": "/rag-real/chat/completions"}
OPT_IN = {"rag-real"}
TOOLS_PATH = "/tools/chat/completions"
RETAINED_KB_PER_HANG_UP = 10
BUDGET = {
    "c1_added_ttft_p50_ms": 0.5,
    "cpu_ms_per_stream": 0.5,
    "paced_p99_slack_ms": 40.0,
    "peak_rss_mb": 80.0,
    "rag_retrieval_p50_ms": 5.0,
    "rag_retrieval_p99_ms": 20.0,
    "rag_waiting_p50_ms": 5.0,
    "kb_ingest_mb_per_s": 2.0,
    "c1_minus_relay_ttft_p50_ms": 0.15,
    "plain_rss_mb_after_200": 48.0,
}
# The llmgate source tree the bench runs (--src / LLMGATE_SRC); None: the installed one.
SRC: Path | None = None
# Where llmgate processes keep their bytecode (main sets it in the run's folder): a start
# reads .pyc files as a deployed one does, though PYTHONDONTWRITEBYTECODE is set or the
# tree is read-only, and no source tree gets a __pycache__ from the bench.
PYCACHE: Path | None = None


def llmgate_env() -> dict[str, str] | None:
    """The environment of an llmgate process: with SRC, its llmgate package comes first.
    PYTHONSAFEPATH keeps `python -m` from putting the working directory (this tree) ahead."""
    if SRC is None and PYCACHE is None:
        return None
    env = dict(os.environ)
    if PYCACHE is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    if SRC is not None:
        env.update(PYTHONPATH=str(SRC), PYTHONSAFEPATH="1")
    return env


@contextlib.contextmanager
def src_environ():
    """SRC for the processes started meanwhile from code not written for it (bench_audio)."""
    env = llmgate_env()
    if env is None:
        yield
        return
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def describe_src() -> dict:
    """Which llmgate the bench ran: its folder, commit and whether it had changes."""
    tree = SRC or HERE.parent
    git = ["git", "-C", str(tree)]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run([*git, "status", "--porcelain", "--", "llmgate"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {"path": str(tree), "commit": commit, "llmgate_changed": dirty}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 15.0, poll_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: {url} did not come up") from None
            time.sleep(poll_s)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


class Proc:
    """What /proc says of llmgate: CPU seconds, RSS, open descriptors."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_s(self) -> float:
        """Its CPU seconds and its workers' (with --workers it is their supervisor)."""
        total = 0
        for pid in (self.pid, *self.children()):
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        return total / TICK

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def rss_mb(self, field: str = "VmRSS") -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return 0.0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def sample_peak(self, stop: threading.Event, out: list[float]) -> None:
        peak = 0.0
        while not stop.wait(0.02):
            peak = max(peak, self.rss_mb())
        out.append(peak)


def start_mock() -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([PY, str(HERE / "bench_mock.py")], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if "listening" not in line:
        raise SystemExit("bench: the mock upstream did not start")
    return proc, int(line.rsplit(":", 1)[1])


def build_kb(workdir: Path, kb: str, write_docs) -> dict:
    """Documents written by `write_docs(folder, rng)` (which returns questions about them),
    ingested through `kb ingest` into [kb.<kb>]; returns the ingest's speed and chunk count."""
    rng = random.Random(1)
    docs = workdir / f"docs-{kb}"
    docs.mkdir()
    questions = write_docs(docs, rng)
    size = sum(p.stat().st_size for p in docs.iterdir())
    (workdir / f"questions-{kb}.txt").write_text("\n".join(questions) + "\n")
    (workdir / "bench.toml").write_text(_config(0, 0))
    kb_cli = [PY, "-m", "llmgate", "kb"]
    kb_args = ["--config", str(workdir / "bench.toml"), "--kb", kb]
    started = time.monotonic()
    subprocess.run([*kb_cli, "ingest", *kb_args, str(docs)], check=True, capture_output=True,
                   cwd=HERE.parent, env=llmgate_env())
    seconds = time.monotonic() - started
    stats = subprocess.run([*kb_cli, "stats", *kb_args], check=True, capture_output=True,
                           text=True, cwd=HERE.parent, env=llmgate_env()).stdout
    return {"kb_mb": round(size / 2**20, 1), "ingest_s": round(seconds, 2),
            "ingest_mb_per_s": round(size / 2**20 / seconds, 2),
            "kb_chunks": int(re.search(r"(\d+) chunks", stats)[1])}


def synthetic_docs(chunks: int):
    """Markdown files of Zipf-distributed words, one chunk a paragraph; questions of four."""

    def write(docs: Path, rng: random.Random) -> list[str]:
        vocab = [f"w{i}" for i in range(50_000)]
        cum = list(itertools.accumulate(1 / (i + 1) for i in range(len(vocab))))
        per_file = max(chunks // 100, 1)
        for f in range(chunks // per_file):
            paragraphs = [
                f"## Part {p}\n\n" + " ".join(rng.choices(vocab, cum_weights=cum, k=55))
                for p in range(per_file)
            ]
            (docs / f"doc{f:04}.md").write_text(f"# Document {f}\n\n" + "\n\n".join(paragraphs))
        return [" ".join(rng.choices(vocab[200:20_000], k=4)) for _ in range(2000)]

    return write


def real_docs(max_mb: float):
    """Text every machine with Python and Debian has: Python's reference docs (pydoc_data),
    the long descriptions of the venv's packages, the common licenses, then the newest
    REAL_CHANGELOG_KB of each Debian changelog until max_mb (/usr/share/doc may be trimmed
    on a slim image: fewer chunks then). Questions: 5 to 8 consecutive words of its lines."""

    def write(docs: Path, rng: random.Random) -> list[str]:
        from pydoc_data.topics import topics

        texts = {f"python-{k}.txt": v for k, v in topics.items()}
        for meta in sorted(Path(sysconfig.get_paths()["purelib"]).glob("*.dist-info/METADATA")):
            texts[meta.parent.name + ".md"] = meta.read_text(errors="replace").partition("\n\n")[2]
        for lic in sorted(Path("/usr/share/common-licenses").glob("*")):
            if lic.is_file():
                texts[f"license-{lic.name}.txt"] = lic.read_text(errors="replace")
        budget = max_mb * 2**20 - sum(map(len, texts.values()))
        for log in sorted({p.resolve() for p in Path("/usr/share/doc").glob("*/changelog*.gz")}):
            if budget <= 0:
                break
            with gzip.open(log) as f:
                text = f.read(REAL_CHANGELOG_KB * 1024).decode(errors="replace")
            texts[f"changelog-{log.parent.name}-{log.name[:-3]}.txt"] = text
            budget -= len(text)
        lines = []
        for name, text in texts.items():
            (docs / name).write_text(text)
            words = (re.findall(r"[A-Za-z]+", line) for line in text.splitlines())
            lines += [w for w in words if len(w) >= 8]
        questions = []
        for words in rng.sample(lines, min(len(lines), 500)):
            n = rng.randint(5, 8)
            start = rng.randrange(len(words) - n + 1)
            questions.append(" ".join(words[start : start + n]) + "?")
        return questions

    return write


# The benchmark drives one key far past [server.limits]' defaults on purpose.
BENCH_LIMITS = (
    "[server.limits]\nmax_concurrent = 100000\nrequests_per_minute = 100000000\n"
    "global_max_concurrent = 100000\n"
)


def _plain_config(port: int, mock_port: int) -> str:
    """The server, the mock provider and the plain route: all plain-rss's llmgate has."""
    return (
        f'[server]\nport = {port}\napi_keys = ["bench"]\n'
        + ("metrics = false\n" if os.environ.get("BENCH_NO_METRICS") else "")
        + BENCH_LIMITS
        + f'[providers.mock]\nbase_url = "http://127.0.0.1:{mock_port}/v1"\n'
        '[[routes]]\npath = "/chat/completions"\n'
    )


def _config(port: int, mock_port: int) -> str:
    return (
        f'[server]\nport = {port}\napi_keys = ["bench"]\n'
        + ("metrics = false\n" if os.environ.get("BENCH_NO_METRICS") else "")
        + BENCH_LIMITS
        + f'[providers.mock]\nbase_url = "http://127.0.0.1:{mock_port}/v1"\n'
        '[models]\n"one-mock-20-0-0" = ["mock/mock-20-0-0"]\n'
        '"two-mock-20-0-0" = ["mock/mock-20-0-0", "mock/mock-20-0-0"]\n'
        '[kb.bench]\npath = "kb.sqlite"\nchunk_tokens = 60\noverlap_tokens = 0\n'
        '[rag.bench]\nkb = "bench"\n'
        '[kb.real]\npath = "kb-real.sqlite"\nchunk_tokens = 60\noverlap_tokens = 0\n'
        '[rag.real]\nkb = "real"\n'
        f'[[routes]]\npath = "/chat/completions"\n[[routes]]\npath = "{RAG_PATHS["rag"]}"\n'
        'rag = "bench"\n'
        f'[[routes]]\npath = "{RAG_PATHS["rag-real"]}"\nrag = "real"\n'
        '[tools.lookup]\nkind = "http"\nurl = "http://127.0.0.1:9/lookup"\n'
        'description = "Look something up."\n'
        f'[[routes]]\npath = "{TOOLS_PATH}"\ntools = ["lookup"]\n'
    )


def start_llmgate(
    mock_port: int, workdir: Path, workers: int = 1, name: str = "bench", config_of=_config
) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = workdir / f"{name}.toml"
    config.write_text(config_of(port, mock_port))
    log_name = "llmgate.log" if name == "bench" else f"{name}.log"
    log = open(workdir / log_name, "w")  # noqa: SIM115 - lives as long as the process
    extra = ["--workers", str(workers)] if workers > 1 else []
    proc = subprocess.Popen(
        [PY, "-m", "llmgate", "--config", str(config), *extra], stderr=log, cwd=HERE.parent,
        env=llmgate_env(),
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", poll_s=0.005)
    except SystemExit:
        proc.kill()
        raise
    if workers > 1:
        time.sleep(1.0)  # every worker listening, not only the first
    return proc, port


def start_relay(mock_port: int) -> tuple[subprocess.Popen, int]:
    upstream = f"http://127.0.0.1:{mock_port}/v1/chat/completions"
    proc = subprocess.Popen(
        [PY, str(HERE / "bench_relay.py"), "--upstream", upstream],
        stdout=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if "listening" not in line:
        raise SystemExit("bench: the relay did not start")
    return proc, int(line.rsplit(":", 1)[1])


def drive(url: str, options: dict) -> dict:
    args = [PY, str(HERE / "bench_load.py"), "--url", url]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def summarize(run: dict) -> dict:
    results = run["results"]
    ttft = [r["ttft"] for r in results if "ttft" in r]
    total = [r["total"] for r in results if "total" in r]
    failed = [r["error"] for r in results if "error" in r]
    return {
        "requests": len(results),
        "failed": len(failed),
        "errors": sorted(set(failed))[:5],
        "rps": round(len(results) / run["elapsed_s"], 1),
        "ttft_p50_ms": pct(ttft, 0.5),
        "ttft_p99_ms": pct(ttft, 0.99),
        "total_p50_ms": pct(total, 0.5),
        "total_p99_ms": pct(total, 0.99),
    }


def run_scenario(
    options: dict,
    mock_url: str,
    gw_url: str,
    gw: Proc,
    path: str = "/chat/completions",
    relay: tuple[str, Proc] | None = None,
) -> dict:
    options = dict(options)
    rounds = options.pop("rounds", 1)
    # the model prefix names an alias llmgate knows; the mock, asked directly, does not
    gw_only = {"model_prefix": options.pop("model_prefix")} if "model_prefix" in options else {}
    hang_up = options.get("hang_up", False)
    direct_url, gw_chat = f"{mock_url}/v1/chat/completions", f"{gw_url}/v1{path}"
    warm_peak = 0.0
    if hang_up:  # untimed rounds first: what stays after them is the allocator's, not a leak
        for w in range(2):
            drive(gw_chat, {**options, **_tag(hang_up, f"w{w}_")})
            _settle(gw, mock_url)
        warm_peak = gw.rss_mb("VmHWM")
    fds0, rss0 = gw.fds(), gw.rss_mb()
    with contextlib.suppress(OSError):
        Path(f"/proc/{gw.pid}/clear_refs").write_text("5")  # reset VmHWM for this run
    stop, peaks = threading.Event(), []
    sampler = threading.Thread(target=gw.sample_peak, args=(stop, peaks))
    sampler.start()
    directs, throughs, relayed, cpu, relay_cpu = [], [], [], 0.0, 0.0
    try:
        # Direct, the relay and llmgate take turns, so drift on the machine hits all alike.
        for r in range(rounds):
            directs.append(drive(direct_url, {**options, **_tag(hang_up, f"d{r}_")}))
            if relay is not None:
                relay_url, relay_proc = relay
                cpu0 = relay_proc.cpu_s()
                relayed.append(drive(f"{relay_url}/v1{path}", options))
                relay_cpu += relay_proc.cpu_s() - cpu0
            cpu0 = gw.cpu_s()
            throughs.append(drive(gw_chat, {**options, **gw_only, **_tag(hang_up, f"g{r}_")}))
            cpu += gw.cpu_s() - cpu0
    finally:
        stop.set()
        sampler.join()
    raw_direct, raw = _merge(directs), _merge(throughs)
    direct, through = summarize(raw_direct), summarize(raw)
    out = {
        "direct": direct,
        "llmgate": through,
        "added_ttft_p50_ms": _diff(through["ttft_p50_ms"], direct["ttft_p50_ms"]),
        "added_ttft_p99_ms": _diff(through["ttft_p99_ms"], direct["ttft_p99_ms"]),
        # warm-up requests ran through llmgate too, so they are counted in the divisor
        "cpu_ms_per_request": round(
            cpu * 1000 / max(through["requests"] + raw["warmup_requests"], 1), 3
        ),
        "peak_rss_mb": round(max(peaks[0] if peaks else 0.0, gw.rss_mb("VmHWM")), 1),
        "rss_mb_before": round(rss0, 1),
        "fds_before": fds0,
    }
    if relay is not None:
        raw_relay = _merge(relayed)
        thin = summarize(raw_relay)
        relay_cpu_ms = round(
            relay_cpu * 1000 / max(thin["requests"] + raw_relay["warmup_requests"], 1), 3
        )
        out.update(
            relay=thin,
            relay_added_ttft_p50_ms=_diff(thin["ttft_p50_ms"], direct["ttft_p50_ms"]),
            relay_added_ttft_p99_ms=_diff(thin["ttft_p99_ms"], direct["ttft_p99_ms"]),
            relay_cpu_ms_per_request=relay_cpu_ms,
            llmgate_minus_relay_ttft_p50_ms=_diff(through["ttft_p50_ms"], thin["ttft_p50_ms"]),
            llmgate_minus_relay_ttft_p99_ms=_diff(through["ttft_p99_ms"], thin["ttft_p99_ms"]),
            llmgate_minus_relay_cpu_ms_per_request=round(
                out["cpu_ms_per_request"] - relay_cpu_ms, 3
            ),
        )
    if hang_up:
        out["direct"].update(_close_lags(raw_direct, mock_url))
        out["llmgate"].update(_close_lags(raw, mock_url))
        _settle(gw, mock_url, fds0)
        out.update(
            fds_after=gw.fds(),
            rss_mb_after=round(gw.rss_mb(), 1),
            # The same storm ran twice before: a leak would climb past their peak.
            rss_mb_warm_peak=round(warm_peak, 1),
        )
    return out


def best_wall_s(argv: list[str], times: int) -> tuple[float, list[float]]:
    """The shortest of `times` wall times of a command run to its end (an llmgate env)."""
    runs = []
    for _ in range(times):
        started = time.monotonic()
        subprocess.run(argv, check=True, capture_output=True, cwd=HERE.parent, env=llmgate_env())
        runs.append(round(time.monotonic() - started, 3))
    return min(runs), runs


def plain_rss(options: dict, mock_port: int, workdir: Path, starts: int) -> dict:
    """A second llmgate with only the plain route: how long it takes to answer /healthz from
    its process start (best of `starts`: the first may still write .pyc files), what
    `import llmgate.cli` costs alone (and `python -c pass`, the interpreter's share of it),
    and its RSS after the streams in `options`."""
    startup = []
    for _ in range(starts):
        started = time.monotonic()
        proc, port = start_llmgate(mock_port, workdir, name="plain", config_of=_plain_config)
        startup.append(round(time.monotonic() - started, 3))
        if len(startup) < starts:
            proc.terminate()
            proc.wait(timeout=10)
    try:
        gw = Proc(proc.pid)
        startup_peak = gw.rss_mb("VmHWM")  # run_scenario resets VmHWM to time its own run
        out = run_scenario(options, f"http://127.0.0.1:{mock_port}", f"http://127.0.0.1:{port}",
                           gw)
        rss_after, hwm_after = gw.rss_mb(), gw.rss_mb("VmHWM")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    bare_s, _ = best_wall_s([PY, "-c", "pass"], starts)
    import_s, import_runs = best_wall_s([PY, "-c", "import llmgate.cli"], starts)
    out.update(
        streams=out["llmgate"]["requests"],
        startup_s=min(startup),
        startup_s_runs=startup,
        import_s=import_s,
        import_s_runs=import_runs,
        python_bare_s=bare_s,
        rss_mb_after_startup=out["rss_mb_before"],
        rss_mb_after_200=round(rss_after, 1),
        # VmHWM since start-up: the higher of the start-up's and the streams' peaks
        peak_rss_mb=round(max(startup_peak, hwm_after, out["peak_rss_mb"]), 1),
    )
    return out


def _settle(gw: Proc, mock_url: str, fds: int | None = None) -> None:
    """Wait until the mock has no stream open and llmgate's descriptors are back down."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        stats = get_json(f"{mock_url}/stats")
        if stats["started"] == stats["completed"] + stats["aborted"] and (
            fds is None or gw.fds() <= fds
        ):
            return
        time.sleep(0.05)


def _merge(runs: list[dict]) -> dict:
    return {
        "elapsed_s": sum(r["elapsed_s"] for r in runs),
        "results": [x for r in runs for x in r["results"]],
        "warmup_requests": sum(r["warmup_requests"] for r in runs),
    }


def _tag(hang_up: bool, prefix: str) -> dict:
    return {"tag": prefix} if hang_up else {}


def _close_lags(raw: dict, mock_url: str) -> dict:
    """Did every upstream request see its connection close after the hang-up, and how soon?"""
    tags = {r["tag"]: r["closed_at"] for r in raw["results"] if "closed_at" in r}
    deadline = time.monotonic() + 15
    while True:
        aborts = get_json(f"{mock_url}/stats")["aborts"]
        if all(t in aborts for t in tags) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    lags = [(aborts[t] - closed) * 1000 for t, closed in tags.items() if t in aborts]
    return {
        "hung_up": len(tags),
        "upstream_closed": len(lags),
        "close_lag_p50_ms": pct(lags, 0.5),
        "close_lag_max_ms": pct(lags, 1.0),
    }


def _retrieval_times(log: Path, start: int = 0) -> dict:
    """Retrieval's share of the RAG turns, from llmgate's turn lines past byte `start`."""
    text = log.read_bytes()[start:].decode(errors="replace")
    times = [float(m) for m in re.findall(r'"retrieval_ms":([0-9.]+)', text)]
    return {"retrieval_p50_ms": pct(times, 0.5), "retrieval_p99_ms": pct(times, 0.99),
            "retrievals": len(times)}


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def budget(results: dict) -> list[tuple[str, bool, str]]:
    checks: list[tuple[str, bool, str]] = []
    if "c1" in results:
        added = results["c1"]["added_ttft_p50_ms"]
        ok = added is not None and added <= 0.5
        checks.append(("c1 added ttft p50 <= 0.5 ms", ok, f"{added} ms"))
        if "llmgate_minus_relay_ttft_p50_ms" in results["c1"]:
            over, limit = results["c1"]["llmgate_minus_relay_ttft_p50_ms"], BUDGET[
                "c1_minus_relay_ttft_p50_ms"
            ]
            ok = over is not None and over <= limit
            label = f"c1 ttft p50 <= the thin relay's + {limit:g} ms"
            checks.append((label, ok, f"{_signed(over)} ms"))
    for name in ("c1", "c50"):
        if name in results:
            cpu = results[name]["cpu_ms_per_request"]
            checks.append((f"{name} cpu per 20-chunk stream <= 0.5 ms", cpu <= 0.5, f"{cpu} ms"))
    if "paced-c200" in results:
        r = results["paced-c200"]
        slack, failed = r["added_ttft_p99_ms"], r["llmgate"]["failed"]
        ok = slack is not None and slack <= 40 and failed == 0
        label = "paced-c200 p99 ttft <= direct + 40 ms, none failed"
        checks.append((label, ok, f"+{slack} ms, {failed} failed"))
        rss = r["peak_rss_mb"]
        checks.append(("peak RSS at 200 streams <= 80 MB", rss <= 80, f"{rss} MB"))
    if "disconnect" in results:
        r = results["disconnect"]
        g = r["llmgate"]
        ok = 0 < g["hung_up"] == g["upstream_closed"]
        ok = (
            ok
            and r["fds_after"] <= r["fds_before"]
            # Python keeps freed arenas, so RSS after a storm wobbles with its peak; a leak
            # of one response's objects (tens of KB) per hang-up would show well past this.
            and r["rss_mb_after"] - r["rss_mb_before"]
            <= RETAINED_KB_PER_HANG_UP * g["hung_up"] / 1024
        )
        value = (
            f"{g['upstream_closed']}/{g['hung_up']} closed, fds {r['fds_before']}->"
            f"{r['fds_after']}, RSS {r['rss_mb_before']}->{r['rss_mb_after']} MB"
            f" (warm-up peak {r['rss_mb_warm_peak']} MB)"
        )
        label = (
            "disconnect: every upstream closed, fds back, "
            f"RSS kept <= {RETAINED_KB_PER_HANG_UP} KB a hang-up"
        )
        checks.append((label, ok, value))
    if "plain-rss" in results:
        r = results["plain-rss"]
        rss, limit = r["rss_mb_after_200"], BUDGET["plain_rss_mb_after_200"]
        label = f"plain-route process RSS after {r['streams']} streams <= {limit:g} MB"
        ok = rss <= limit and r["llmgate"]["failed"] == 0
        checks.append((label, ok, f"{rss} MB (peak {r['peak_rss_mb']} MB)"))
    if "rag" in results:
        r = results["rag"]
        for key, label in (("retrieval_p50_ms", "p50"), ("retrieval_p99_ms", "p99")):
            value, limit = r[key], BUDGET[f"rag_{key}"]
            ok = value is not None and value <= limit
            checks.append((f"rag retrieval {label} <= {limit:g} ms", ok, f"{value} ms"))
        waiting = r["llmgate"]["ttft_p50_ms"]
        ok = waiting is not None and waiting <= BUDGET["rag_waiting_p50_ms"]
        checks.append(("rag waiting phrase p50 <= 5 ms", ok, f"{waiting} ms"))
        speed = r["ingest_mb_per_s"]
        ok = speed >= BUDGET["kb_ingest_mb_per_s"]
        checks.append(("kb ingest >= 2 MB/s", ok, f"{speed} MB/s ({r['kb_mb']} MB)"))
    return checks


def print_table(results: dict, checks: list) -> None:
    rows = [("scenario", "metric", "direct", "llmgate", "added")]
    for name, r in results.items():
        d, g = r["direct"], r["llmgate"]
        metrics = (
            "ttft_p50_ms",
            "ttft_p99_ms",
            "total_p50_ms",
            "rps",
            "failed",
            "upstream_closed",
            "close_lag_p50_ms",
            "close_lag_max_ms",
        )
        for metric in metrics:
            if d.get(metric) is None and g.get(metric) is None:
                continue
            added = _diff(g[metric], d[metric])
            rows.append((name, metric, str(d[metric]), str(g[metric]), _signed(added)))
        for key in ("retrieval_p50_ms", "retrieval_p99_ms", "ingest_mb_per_s", "kb_chunks"):
            if key in r:
                rows.append((name, key, "", str(r[key]), ""))
        rows.append((name, "llmgate cpu ms/request", "", str(r["cpu_ms_per_request"]), ""))
        rows.append((name, "llmgate peak rss MB", "", str(r["peak_rss_mb"]), ""))
        if "fds_after" in r:
            rows.append(
                (name, "fds before -> after", "", f"{r['fds_before']} -> {r['fds_after']}", "")
            )
            rows.append(
                (
                    name,
                    "rss MB before -> after",
                    "",
                    f"{r['rss_mb_before']} -> {r['rss_mb_after']}",
                    "",
                )
            )
        plain = (
            ("startup_s", "start until /healthz, s (best)"),
            ("import_s", "import llmgate.cli, s (best)"),
            ("python_bare_s", "python -c pass, s (best)"),
            ("rss_mb_after_startup", "rss MB after start-up"),
            ("rss_mb_after_200", "rss MB after the streams"),
        )
        for key, label in plain:
            if key in r:
                rows.append((name, label, "", str(r[key]), ""))
    _print_rows(rows)
    relayed = {name: r for name, r in results.items() if "relay" in r}
    if relayed:
        print("\nthe same rounds through a thin aiohttp relay (scripts/bench_relay.py)")
        rows = [("scenario", "metric", "direct", "relay", "llmgate", "llmgate - relay")]
        for name, r in relayed.items():
            d, t, g = r["direct"], r["relay"], r["llmgate"]
            for metric in ("ttft_p50_ms", "ttft_p99_ms", "total_p50_ms", "rps", "failed"):
                rows.append((name, metric, str(d[metric]), str(t[metric]), str(g[metric]),
                             _signed(_diff(g[metric], t[metric]))))
            rows.append((name, "added ttft_p50_ms", "", _signed(r["relay_added_ttft_p50_ms"]),
                         _signed(r["added_ttft_p50_ms"]),
                         _signed(r["llmgate_minus_relay_ttft_p50_ms"])))
            rows.append((name, "cpu ms/request", "", str(r["relay_cpu_ms_per_request"]),
                         str(r["cpu_ms_per_request"]),
                         _signed(r["llmgate_minus_relay_cpu_ms_per_request"])))
        _print_rows(rows)
    print()
    for label, ok, value in checks:
        print(f"{'PASS' if ok else 'MISS'}  {label}: {value}")


def _print_rows(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


def print_audio(audio: dict) -> None:
    print("\naudio (first audio: after the first sentence's full stop; ms)")
    keys = (
        ("first_audio_long_p50_ms", "first audio p50, 13-word sentence"),
        ("first_audio_short_p50_ms", "first audio p50, 5-word sentence"),
        ("first_audio_short_max_ms", "first audio max, 5-word sentence"),
        ("first_audio_long_after_first_word_p50_ms", "first audio after the first word"),
        ("rtf", "synthesis, x real time"),
        ("max_paced_streams", "paced streams, no frame late"),
    )
    for engine, r in audio.items():
        for key, label in keys:
            print(f"  {engine:8} {label:38} {r[key]}")


def _cpu_times() -> list[int]:
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def _steal_percent(before: list[int], after: list[int]) -> float:
    """Share of the machine's CPU time the hypervisor gave to others (8th field of `cpu`)."""
    delta = [b - a for a, b in zip(before, after, strict=True)]
    return round(100 * delta[7] / max(sum(delta), 1), 1)


def _signed(value: float | None) -> str:
    return "" if value is None else f"{value:+g}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "scenarios", nargs="*",
        help=f"any of {', '.join(SCENARIOS)} (all but {', '.join(sorted(OPT_IN))})",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--quick", action="store_true", help="tiny runs (a smoke test)")
    parser.add_argument(
        "--workers", type=int, default=1, help="llmgate --workers N (CPU: all of them)"
    )
    parser.add_argument(
        "--src", metavar="PATH", default=os.environ.get("LLMGATE_SRC"),
        help="run llmgate from this source tree (e.g. a git worktree of main), not the "
        "installed one: PYTHONPATH for the llmgate processes only (default: $LLMGATE_SRC)",
    )
    parser.add_argument(
        "--kind", choices=("sqlite", "postgres"), default="sqlite",
        help="rag --kind postgres: the knowledge base's stores side by side "
        "(scripts/bench_kb.py: ingest, lexical and hybrid retrieval, SQLite and PostgreSQL)",
    )
    args = parser.parse_args()
    if args.kind == "postgres":
        if set(args.scenarios) - {"rag"}:
            parser.error("--kind postgres is for the rag scenario alone")
        import bench_kb

        return bench_kb.run(KB_CHUNKS_QUICK if args.quick else KB_CHUNKS, args.json)
    global SRC
    if args.src:
        SRC = Path(args.src).resolve()
        if not (SRC / "llmgate" / "__init__.py").is_file():
            parser.error(f"--src {args.src}: no llmgate package there")
    src = describe_src()
    print(f"llmgate from {src['path']} at {src['commit']}"
          + (" (llmgate/ changed since)" if src["llmgate_changed"] else ""),
          file=sys.stderr, flush=True)
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario {', '.join(sorted(unknown))}")
    workdir = Path(tempfile.mkdtemp(prefix="llmgate-bench-"))
    global PYCACHE
    PYCACHE = workdir / "pycache"
    cpu_before = _cpu_times()
    names = args.scenarios or [n for n in SCENARIOS if n not in OPT_IN]
    kb_built: dict = {}
    audio: dict = {}
    if "rag" in names:
        print("building a knowledge base ...", file=sys.stderr, flush=True)
        docs = synthetic_docs(KB_CHUNKS_QUICK if args.quick else KB_CHUNKS)
        kb_built["rag"] = build_kb(workdir, "bench", docs)
    if "rag-real" in names:
        print("building a knowledge base of real text ...", file=sys.stderr, flush=True)
        docs = real_docs(REAL_KB_MB_QUICK if args.quick else REAL_KB_MB)
        kb_built["rag-real"] = build_kb(workdir, "real", docs)
    mock, mock_port = start_mock()
    gateway = relay = None
    try:
        gateway, gw_port = start_llmgate(mock_port, workdir, args.workers)
        gw = Proc(gateway.pid)
        if RELAYED & set(names):
            relay, relay_port = start_relay(mock_port)
            relay_at = (f"http://127.0.0.1:{relay_port}", Proc(relay.pid))
        results = {}
        for name in names:
            if name == "audio":
                import bench_audio  # its own upstream and llmgate; it imports from here

                print("running audio ...", file=sys.stderr, flush=True)
                if SRC is not None:  # its engines run in this process too
                    sys.path.insert(0, str(SRC))
                with src_environ():
                    audio = asyncio.run(bench_audio.run(bench_audio.available(), args.quick))
                continue
            options = dict(SCENARIOS[name])
            if args.quick:
                options["requests"], options["concurrency"] = QUICK[name]
                options["warmup"] = min(options.get("warmup", 0), 1)
                options["rounds"] = 1
            print(f"running {name} ...", file=sys.stderr, flush=True)
            if name == "plain-rss":
                starts = STARTS_QUICK if args.quick else STARTS
                results[name] = plain_rss(options, mock_port, workdir, starts)
                continue
            path = "/chat/completions"
            if name in RAG_PATHS:
                kb = "bench" if name == "rag" else "real"
                options["questions"] = str(workdir / f"questions-{kb}.txt")
                path = RAG_PATHS[name]
                log_at = (workdir / "llmgate.log").stat().st_size
            if name == "tools":
                path = TOOLS_PATH
            results[name] = run_scenario(
                options, f"http://127.0.0.1:{mock_port}", f"http://127.0.0.1:{gw_port}", gw, path,
                relay_at if name in RELAYED else None,
            )
            if name in RAG_PATHS:
                log = _retrieval_times(workdir / "llmgate.log", log_at)
                results[name].update(kb_built[name], **log)
    finally:
        for proc in (gateway, relay, mock):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=10)
        shutil.rmtree(PYCACHE, ignore_errors=True)
    steal = _steal_percent(cpu_before, _cpu_times())
    checks = budget(results)
    if audio:
        import bench_audio

        checks += bench_audio.checks(audio)
    print_table(results, checks)
    if audio:
        print_audio(audio)
    print(
        f"\n{os.cpu_count()} cores; CPU stolen by the hypervisor during the run: {steal}%"
        + (" (numbers are noisy)" if steal > 2 else "")
    )
    if args.json:
        report = {
            "machine": {
                "cores": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
                "steal_percent": steal,
            },
            "llmgate_src": src,
            "budget": BUDGET,
            "checks": [{"check": c, "ok": ok, "value": v} for c, ok, v in checks],
            "scenarios": {**results, **({"audio": audio} if audio else {})},
        }
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
