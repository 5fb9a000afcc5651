"""A soak of Agora-like calls through llmgate: does anything pile up per turn or per channel?

    .venv/bin/python scripts/soak.py                          # 50 calls, 20 min, both routes
    .venv/bin/python scripts/soak.py --route rag --minutes 3  # the RAG + speech route alone
    .venv/bin/python scripts/soak.py --route plain --minutes 3 --json soak.json
    .venv/bin/python scripts/soak.py --route speech --minutes 3   # or rag-only: one stage

Three processes: a mock upstream (scripts/soak_mock.py: bench_mock's protocol, answering in
markdown, emoji and links), llmgate (`python -m llmgate`, JSON log to a file) with a plain
route and a RAG route (`speech = true`, over a knowledge base built by bench.build_kb), and
this driver. Each of --calls concurrent calls is a channel (`context.appId/channel`) whose
user turn_id goes up by one a turn; its history grows like the engine's (user turns with
turn_id and timestamp, the assistant's answers) and is capped at --history messages; a call
lasts --call-turns turns, then a new call (a new channel) takes its place. Each turn asks a
different question. About --barge of the turns are barged in on, half each way: the caller
hangs up mid-answer, or a newer turn_id on the same channel arrives while the answer streams.

At the end: llmgate's turn lines counted by route, status and error; its ERROR lines (msg,
exc); turns/s; llmgate's CPU per turn; RSS from /proc/<pid>/status every --sample-s seconds,
after warm-up (the first --warmup-turns turns and --warmup-s seconds, whichever ends later)
and its least-squares slope in MB per 1,000 turns and per minute. A table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BENCH_LIMITS, PY, Proc, build_kb, free_port, wait_http

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KEY = "soak"
PLAIN_PATH = "/chat/completions"
RAG_PATH = "/rag/chat/completions"  # rag and speech: the route under test
# one stage alone, to tell which one keeps something (--route speech | rag-only)
SPEECH_PATH = "/speech/chat/completions"
RAG_ONLY_PATH = "/rag-only/chat/completions"
SYSTEM = "You are a helpful voice assistant for Example Corp. Keep answers short."
ROUTES = {
    "rag": (RAG_PATH,),
    "plain": (PLAIN_PATH,),
    "both": (RAG_PATH, PLAIN_PATH),
    "speech": (SPEECH_PATH,),
    "rag-only": (RAG_ONLY_PATH,),
}
ROUTE_NAMES = {
    RAG_PATH: "rag",
    PLAIN_PATH: "plain",
    SPEECH_PATH: "speech",
    RAG_ONLY_PATH: "rag-only",
}
OPENERS = (
    "",
    "tell me about ",
    "what do you know about ",
    "and what about ",
    "how do I ",
    "can you explain ",
    "where can I find ",
    "is there anything on ",
)


# --- the config and the processes --------------------------------------------------------


def config_text(port: int, mock_port: int, kb_path: str = "kb.sqlite") -> str:
    return (
        f'[server]\nport = {port}\napi_keys = ["{KEY}"]\n'
        + BENCH_LIMITS
        + '[log]\nformat = "json"\nlevel = "info"\n'
        + f'[providers.mock]\nbase_url = "http://127.0.0.1:{mock_port}/v1"\n'
        # bench.build_kb ingests into [kb.bench] (its own bench.toml): the same base here
        + f'[kb.bench]\npath = "{kb_path}"\nchunk_tokens = 60\noverlap_tokens = 0\n'
        + '[rag.bench]\nkb = "bench"\n'
        + f'[[routes]]\npath = "{PLAIN_PATH}"\n'
        + f'[[routes]]\npath = "{RAG_PATH}"\nrag = "bench"\nspeech = true\n'
        + f'[[routes]]\npath = "{SPEECH_PATH}"\nspeech = true\n'
        + f'[[routes]]\npath = "{RAG_ONLY_PATH}"\nrag = "bench"\n'
    )


def start_mock() -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([PY, str(HERE / "soak_mock.py")], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if "listening" not in line:
        raise SystemExit("soak: the mock upstream did not start")
    return proc, int(line.rsplit(":", 1)[1])


def start_llmgate(
    workdir: Path, mock_port: int
) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    config = workdir / "soak.toml"
    config.write_text(config_text(port, mock_port))
    log_path = workdir / "llmgate.log"
    log = open(log_path, "w")  # noqa: SIM115 - lives as long as the process
    run = [PY, "-m", "llmgate"]
    proc = subprocess.Popen([*run, "--config", str(config)], stderr=log, cwd=ROOT)
    wait_http(f"http://127.0.0.1:{port}/healthz")
    return proc, port, log_path


def load_questions(workdir: Path) -> list[str]:
    return (workdir / "questions.txt").read_text().split("\n")[:-1]


# --- the calls -----------------------------------------------------------------------------


@dataclass
class Options:
    calls: int = 50
    seconds: float = 1200.0
    routes: tuple[str, ...] = (RAG_PATH, PLAIN_PATH)
    barge: float = 0.3
    history: int = 16
    call_turns: tuple[int, int] = (8, 30)
    think_ms: tuple[int, int] = (200, 800)
    model: str = "mock-30-40-15"  # 30 chunks, first after 40 ms, then one each 15 ms
    seed: int = 1
    max_turns: int | None = None  # stop after this many turns (the tracemalloc driver)


@dataclass
class Tally:
    turns: int = 0  # requests finished (each is one turn line in llmgate's log)
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    channels: int = 0
    started: float = field(default_factory=time.monotonic)
    on_turn: list = field(default_factory=list)  # callbacks(turns) after each turn


class Stop:
    def __init__(self, opts: Options, tally: Tally) -> None:
        self.deadline = time.monotonic() + opts.seconds
        self.opts, self.tally = opts, tally
        self.event = asyncio.Event()

    def __call__(self) -> bool:
        if self.event.is_set():
            return True
        if time.monotonic() >= self.deadline or (
            self.opts.max_turns is not None and self.tally.turns >= self.opts.max_turns
        ):
            self.event.set()
        return self.event.is_set()


async def read_turn(
    session: aiohttp.ClientSession, url: str, body: dict, hang_up_after: float | None
) -> str:
    """One request; its outcome as the caller saw it."""
    try:
        async with session.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
            if r.status != 200:
                await r.read()
                return f"http_{r.status}"
            data = bytearray()
            try:
                async with asyncio.timeout(hang_up_after):
                    async for part in r.content.iter_any():
                        data += part
            except TimeoutError:
                r.close()  # the caller hangs up: the connection goes
                late = data.endswith(b"data: [DONE]\n\n")
                return "done_before_hang_up" if late else "hung_up"
            if data.endswith(b"data: [DONE]\n\n"):
                return "done"
            if b'"error"' in data[-400:]:
                return "error_frame"
            return "ended_without_done"
    except aiohttp.ClientError as exc:
        return f"client_{type(exc).__name__}"


def _user(text: str, turn_id: int) -> dict:
    return {
        "role": "user",
        "content": text,
        "turn_id": turn_id,
        "timestamp": int(time.time() * 1000),
    }


def _assistant(turn_id: int, rng: random.Random) -> dict:
    words = " ".join(f"word{rng.randrange(1000)}" for _ in range(rng.randrange(8, 40)))
    return {
        "role": "assistant",
        "content": f"Sure, {words}.",
        "turn_id": turn_id,
        "timestamp": int(time.time() * 1000),
    }


async def one_call(
    slot: int,
    session: aiohttp.ClientSession,
    base: str,
    questions: list[str],
    opts: Options,
    tally: Tally,
    stop: Stop,
) -> None:
    rng = random.Random(opts.seed * 100_003 + slot)
    route = opts.routes[slot % len(opts.routes)]
    url = base + route
    generation = 0
    while not stop():
        generation += 1
        tally.channels += 1
        channel = f"soak-{slot}-{generation}"
        context = {"appId": "soakapp", "channel": channel, "userId": str(1000 + slot)}
        messages: list[dict] = [{"role": "system", "content": SYSTEM}]
        turn_id = 0
        for _ in range(rng.randint(*opts.call_turns)):
            if stop():
                return
            turn_id += 1
            question = rng.choice(OPENERS) + rng.choice(questions)
            messages.append(_user(question, turn_id))
            head, tail = messages[:1], messages[1:][-opts.history :]
            messages = head + tail
            body = {
                "model": opts.model,
                "stream": True,
                "messages": messages,
                "context": context,
                "max_tokens": 256,
                "user_uid": context["userId"],
            }
            roll = rng.random()
            answer_s = 0.04 + 0.015 * 30
            if roll < opts.barge / 2:  # hang-up mid-answer
                outcome = await read_turn(session, url, body, rng.uniform(0.02, answer_s * 0.8))
                _count(tally, f"hang_up:{outcome}")
            elif roll < opts.barge:  # a newer turn_id on the channel while this one streams
                older = asyncio.ensure_future(read_turn(session, url, body, None))
                await asyncio.sleep(rng.uniform(0.02, answer_s * 0.7))
                turn_id += 1
                messages.append(_user(rng.choice(questions), turn_id))
                newer_body = {**body, "messages": head + messages[1:][-opts.history :]}
                newer = await read_turn(session, url, newer_body, None)
                _count(tally, f"superseded_turn:{await older}")
                _count(tally, f"superseding_turn:{newer}")
            else:
                _count(tally, f"normal:{await read_turn(session, url, body, None)}")
            messages.append(_assistant(turn_id, rng))
            await asyncio.sleep(rng.uniform(*opts.think_ms) / 1000)


def _count(tally: Tally, outcome: str) -> None:
    tally.outcomes[outcome] += 1
    tally.turns += 1 + (outcome.startswith("superseded_turn"))
    for callback in tally.on_turn:
        callback(tally.turns)


async def run_calls(base: str, questions: list[str], opts: Options, tally: Tally) -> None:
    stop = Stop(opts, tally)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Calls start over the first second, not in lockstep.
        async def staggered(slot: int) -> None:
            await asyncio.sleep(slot / max(opts.calls, 1))
            await one_call(slot, session, base, questions, opts, tally, stop)

        await asyncio.gather(*(staggered(s) for s in range(opts.calls)))


# --- RSS and the log -----------------------------------------------------------------------


async def sample_rss(
    rss_mb,
    tally: Tally,
    every_s: float,
    out: list[tuple[float, int, float]],
    done: asyncio.Event,
) -> None:
    """(seconds since start, turns so far, RSS MB) every `every_s`."""
    while True:
        out.append((round(time.monotonic() - tally.started, 2), tally.turns, round(rss_mb(), 3)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), every_s)
            out.append(
                (round(time.monotonic() - tally.started, 2), tally.turns, round(rss_mb(), 3))
            )
            return


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least squares: dy/dx."""
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if not sxx:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def rss_report(samples: list[tuple[float, int, float]], warm_turns: int, warm_s: float) -> dict:
    after = [s for s in samples if s[1] >= warm_turns and s[0] >= warm_s]
    out: dict = {
        "samples": len(samples),
        "samples_after_warmup": len(after),
        "rss_start_mb": samples[0][2] if samples else None,
        "rss_end_mb": samples[-1][2] if samples else None,
        "rss_peak_mb": max((s[2] for s in samples), default=None),
    }
    if after:
        per_turn = slope([s[1] for s in after], [s[2] for s in after])
        per_s = slope([s[0] for s in after], [s[2] for s in after])
        out.update(
            rss_after_warmup_mb=after[0][2],
            warmup_ended_at_turn=after[0][1],
            warmup_ended_at_s=after[0][0],
            rss_growth_after_warmup_mb=round(after[-1][2] - after[0][2], 3),
            turns_after_warmup=after[-1][1] - after[0][1],
            mb_per_1000_turns=None if per_turn is None else round(per_turn * 1000, 4),
            mb_per_minute=None if per_s is None else round(per_s * 60, 4),
        )
        # the same slope over each half: a leak keeps it, warm-up tails off
        half = len(after) // 2
        for name, part in (("first_half", after[:half]), ("second_half", after[half:])):
            s = slope([x[1] for x in part], [x[2] for x in part])
            out[f"mb_per_1000_turns_{name}"] = None if s is None else round(s * 1000, 4)
    return out


def read_log(path: Path) -> dict:
    statuses: collections.Counter = collections.Counter()
    errors: collections.Counter = collections.Counter()
    warnings: collections.Counter = collections.Counter()
    other = 0
    retrieval: list[float] = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            other += 1
            continue
        level = rec.get("level")
        if rec.get("msg") == "turn":
            route = ROUTE_NAMES.get(rec.get("route"), str(rec.get("route")))
            key = f"{route} {rec.get('status')}" + (f" {rec['error']}" if rec.get("error") else "")
            statuses[key] += 1
            rag = rec.get("rag")
            if isinstance(rag, dict) and isinstance(rag.get("retrieval_ms"), int | float):
                retrieval.append(rag["retrieval_ms"])
        if level in ("error", "critical"):
            errors[f"{rec.get('msg')} | exc={rec.get('exc')}"] += 1
        elif level == "warning":
            warnings[str(rec.get("msg"))[:160]] += 1
    retrieval.sort()
    return {
        "statuses": dict(statuses.most_common()),
        "errors": dict(errors.most_common(20)),
        "warnings": dict(warnings.most_common(10)),
        "non_json_lines": other,
        "retrieval_p50_ms": retrieval[len(retrieval) // 2] if retrieval else None,
        "retrieval_p99_ms": retrieval[int(len(retrieval) * 0.99)] if retrieval else None,
    }


# --- main ----------------------------------------------------------------------------------


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--calls", type=int, default=50, help="concurrent calls (50)")
    p.add_argument("--minutes", type=float, default=20.0, help="how long (20; fractions ok)")
    p.add_argument("--route", choices=tuple(ROUTES), default="both")
    p.add_argument("--barge", type=float, default=0.3, help="share of turns barged in on")
    p.add_argument("--kb-chunks", type=int, default=3000)
    p.add_argument("--history", type=int, default=16, help="messages kept, besides the system")
    p.add_argument("--call-turns", default="8-30", help="turns a call lasts (a range)")
    p.add_argument("--think-ms", default="200-800", help="pause between a call's turns")
    p.add_argument("--model", default="mock-30-40-15", help="mock-<chunks>-<first_ms>-<gap_ms>")
    p.add_argument("--sample-s", type=float, default=3.0)
    p.add_argument("--warmup-turns", type=int, default=1000)
    p.add_argument("--warmup-s", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", metavar="PATH", help="also write the whole report here")
    args = p.parse_args()

    opts = Options(
        calls=args.calls,
        seconds=args.minutes * 60,
        routes=ROUTES[args.route],
        barge=args.barge,
        history=args.history,
        call_turns=_range(args.call_turns),
        think_ms=_range(args.think_ms),
        model=args.model,
        seed=args.seed,
    )
    workdir = Path(tempfile.mkdtemp(prefix="llmgate-soak-"))
    print(
        f"soak: work folder {workdir}; building a {args.kb_chunks}-chunk knowledge base ...",
        file=sys.stderr,
        flush=True,
    )
    build_kb(workdir, args.kb_chunks)
    questions = load_questions(workdir)
    mock, mock_port = start_mock()
    gateway = None
    try:
        gateway, port, log_path = start_llmgate(workdir, mock_port)
        gw = Proc(gateway.pid)
        tally = Tally()
        samples: list[tuple[float, int, float]] = []
        cpu0 = gw.cpu_s()

        async def soak() -> None:
            done = asyncio.Event()
            sampler = asyncio.ensure_future(
                sample_rss(gw.rss_mb, tally, args.sample_s, samples, done)
            )
            progress = asyncio.ensure_future(_progress(tally, samples, opts.seconds))
            try:
                await run_calls(f"http://127.0.0.1:{port}", questions, opts, tally)
            finally:
                done.set()
                await sampler
                progress.cancel()

        print(
            f"soak: {opts.calls} calls for {args.minutes:g} min on {args.route} "
            f"(llmgate pid {gateway.pid}, log {log_path})",
            file=sys.stderr,
            flush=True,
        )
        asyncio.run(soak())
        elapsed = time.monotonic() - tally.started
        cpu = gw.cpu_s() - cpu0
        fds = gw.fds()
        time.sleep(0.3)  # the last turn lines flushed (llmgate batches them for 50 ms)
    finally:
        for proc in (gateway, mock):
            if proc is not None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
    logged = read_log(log_path)
    report = {
        "route": args.route,
        "calls": opts.calls,
        "minutes": round(elapsed / 60, 2),
        "turns": tally.turns,
        "channels": tally.channels,
        "turns_per_s": round(tally.turns / elapsed, 1),
        "llmgate_cpu_ms_per_turn": round(cpu * 1000 / max(tally.turns, 1), 3),
        "llmgate_fds_at_end": fds,
        "caller_outcomes": dict(sorted(tally.outcomes.items())),
        **logged,
        "rss": rss_report(samples, args.warmup_turns, args.warmup_s),
        "command": " ".join([".venv/bin/python", "scripts/soak.py", *sys.argv[1:]]),
    }
    print_report(report)
    print(json.dumps({k: v for k, v in report.items() if k != "rss_samples"}))
    if args.json:
        Path(args.json).write_text(json.dumps({**report, "rss_samples": samples}, indent=1))
    print(f"soak: llmgate's log is {log_path}", file=sys.stderr)
    return 0


async def _progress(tally: Tally, samples: list, seconds: float) -> None:
    while True:
        await asyncio.sleep(30)
        rss = samples[-1][2] if samples else 0
        print(
            f"soak: {time.monotonic() - tally.started:6.0f}/{seconds:.0f} s  "
            f"{tally.turns} turns  rss {rss:.1f} MB",
            file=sys.stderr,
            flush=True,
        )


def print_report(r: dict) -> None:
    rows: list[tuple[str, str]] = [
        ("route / calls / minutes", f"{r['route']} / {r['calls']} / {r['minutes']}"),
        ("turns (channels)", f"{r['turns']} ({r['channels']})"),
        ("turns/s", str(r["turns_per_s"])),
        ("llmgate cpu ms/turn", str(r["llmgate_cpu_ms_per_turn"])),
        ("retrieval p50 / p99 ms", f"{r['retrieval_p50_ms']} / {r['retrieval_p99_ms']}"),
    ]
    rows += [(f"  log: {k}", str(v)) for k, v in r["statuses"].items()]
    rows += [(f"  caller: {k}", str(v)) for k, v in r["caller_outcomes"].items()]
    rows += [(f"  ERROR: {k}", str(v)) for k, v in r["errors"].items()] or [("ERROR lines", "0")]
    rows += [(f"  warning: {k}", str(v)) for k, v in r["warnings"].items()]
    rss = r["rss"]
    rows += [
        (
            "rss start / peak / end MB",
            f"{rss['rss_start_mb']} / {rss['rss_peak_mb']} / {rss['rss_end_mb']}",
        ),
        (
            "rss after warm-up MB (turn, s)",
            f"{rss.get('rss_after_warmup_mb')} ({rss.get('warmup_ended_at_turn')}, "
            f"{rss.get('warmup_ended_at_s')})",
        ),
        ("rss growth after warm-up MB", str(rss.get("rss_growth_after_warmup_mb"))),
        ("MB / 1000 turns after warm-up", str(rss.get("mb_per_1000_turns"))),
        (
            "  first half / second half",
            f"{rss.get('mb_per_1000_turns_first_half')} / "
            f"{rss.get('mb_per_1000_turns_second_half')}",
        ),
        ("MB / minute after warm-up", str(rss.get("mb_per_minute"))),
        ("fds at end", str(r["llmgate_fds_at_end"])),
    ]
    rows = [(a if len(a) <= 72 else a[:69] + "...", b) for a, b in rows]
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a.ljust(width)}  {b}")


if __name__ == "__main__":
    sys.exit(main())
