"""`python -m llmgate kb ingest|search|stats|list|remove|copy --config config.toml --kb NAME`.

What a document holds reaches the terminal escaped (control characters, bidi overrides):
a hostile file cannot move the cursor or retitle the window. Ctrl-C is one line and leaves
the base as it was; output cut short (`kb list | head`) ends quietly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from llmgate import config as configuration
from llmgate.kb import bases
from llmgate.kb.base import Hit, KbError, Writer
from llmgate.kb.embeddings import EmbeddingError, embedder_for
from llmgate.kb.ingest import FORMATS, MAX_FILE_MB, IngestError, files_under, ingest
from llmgate.kb.store import Store

StoredKb = configuration.SqliteKb | configuration.PostgresKb

EXIT_ERROR = 1
EXIT_CONFIG = configuration.EXIT_CONFIG
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
EXIT_PIPE = 141  # 128 + SIGPIPE

# C0 and C1 controls, DEL, and the bidi controls that reorder what is shown
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_LINES = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(char: re.Match[str]) -> str:
    code = ord(char.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: str, lines: bool = False) -> str:
    """`text` with every control character escaped (`lines`: newlines and tabs too)."""
    return (_UNSAFE_LINES if lines else _UNSAFE).sub(_escape, text)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llmgate kb", description="Build and inspect a knowledge base."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default="config.toml", help="TOML config (%(default)s)")
    common.add_argument("--kb", required=True, help="the [kb.NAME] to use")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser(
        "ingest", parents=[common],
        help=f"add files or folders ({', '.join(FORMATS)}, text without an extension)",
    )
    add.add_argument("paths", nargs="+", metavar="PATH")
    add.add_argument("--text-field", default="text", help=".jsonl: the text's field (text)")
    add.add_argument("--follow-symlinks", action="store_true",
                     help="follow symlinks, even out of the folder (never into /proc, /sys, /dev)")
    add.add_argument("--max-file-mb", type=float, default=MAX_FILE_MB,
                     help="skip files larger than this (%(default)g)")
    add.add_argument("--strict", action="store_true",
                     help="a file or .jsonl line that cannot be read fails the command")
    find = commands.add_parser("search", parents=[common], help="the best chunks for a question")
    find.add_argument("question")
    find.add_argument("--k", type=int, default=5, help="how many (%(default)s)")
    shown = find.add_mutually_exclusive_group()
    shown.add_argument("--full", action="store_true", help="whole passages, not a preview")
    shown.add_argument("--json", action="store_true", help="one JSON object a line")
    commands.add_parser("stats", parents=[common], help="files, chunks and size")
    copy = commands.add_parser(
        "copy", parents=[common],
        help="move a SQLite base (vectors and all, not embedded again) into this one",
    )
    copy.add_argument("--from", dest="source", required=True, metavar="PATH.sqlite")
    commands.add_parser("list", parents=[common], help="the files in the base")
    remove = commands.add_parser("remove", parents=[common], help="take files out")
    remove.add_argument("paths", nargs="+", metavar="PATH")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    stop = threading.Event()

    def interrupted(signum: int, frame: Any) -> None:
        stop.set()  # the ingest's worker and SQLite's statement see it at once
        raise KeyboardInterrupt

    # (signals are a main thread's: a caller running this on a thread keeps its own)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, interrupted) if main_thread else None
    try:
        return _main(argv, stop)
    except KeyboardInterrupt:
        print("llmgate: interrupted; the knowledge base is unchanged", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader left (`kb list | head`): no traceback, and none at exit's flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


def _main(argv: list[str], stop: threading.Event) -> int:
    args = parse_args(argv)
    loaded = configuration.load_or_say(args.config)
    if loaded is None:
        return EXIT_CONFIG
    kb = loaded.config.kb.get(args.kb)
    if kb is None:
        known = ", ".join(loaded.config.kb) or "none"
        print(f"llmgate: no [kb.{args.kb}] in {args.config} (there are: {known})", file=sys.stderr)
        return EXIT_CONFIG
    if isinstance(kb, configuration.HttpKb):
        print(f'llmgate: kb.{args.kb} is a retrieval service (kind = "http"): '
              "it has nothing to build here", file=sys.stderr)
        return EXIT_CONFIG
    source = None
    try:
        if args.command == "copy":
            source = Store(Path(args.source), create=False)
        store = bases.writer(args.kb, kb, loaded)
    except KbError as exc:
        if source is not None:
            source.close()
        print(f"llmgate: {safe(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    try:
        return _run(args, store, kb, loaded, stop, source)
    except KeyboardInterrupt:
        print(f"llmgate: interrupted; {_unchanged(store)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (IngestError, KbError) as exc:
        print(f"llmgate: {safe(str(exc))}; {_unchanged(store)}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        store.close()
        if source is not None:
            source.close()


def _unchanged(store: Writer) -> str:
    if isinstance(store, Store):
        return "the knowledge base is unchanged"
    return "every source is whole or absent (each is written in one transaction)"


def _warn(message: str) -> None:
    line = f"llmgate: {safe(message)}"
    if "tqdm" in sys.modules:  # above the progress bar, which is drawn again below
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr)


def _run(
    args: argparse.Namespace,
    store: Writer,
    kb: StoredKb,
    loaded: configuration.Loaded,
    stop: threading.Event,
    source: Store | None,
) -> int:
    if args.command == "ingest":
        return _ingest(args, store, kb, loaded, stop)
    if args.command == "copy":
        assert source is not None
        return _copy(source, store, stop)
    if args.command == "search":
        found = asyncio.run(_search(args.kb, kb, loaded, args.question, args.k))
        for hit in found:
            if args.json:
                print(_json(hit))
                continue
            where = safe(hit.source + (f" > {hit.heading}" if hit.heading else ""))
            text = safe(hit.text.strip(), lines=True) if args.full else _preview(hit.text)
            print(f"{hit.score:7.3f}  {where}\n         {text}" + ("\n" if args.full else ""))
    elif args.command == "stats":
        s = store.stats()
        print(f"{s['files']} files, {s['chunks']} chunks, {s['bytes'] / 2**20:.2f} MB of text, "
              f"{s['file_bytes'] / 2**20:.2f} MB on disk ({safe(store.where)})")
    elif args.command == "list":
        for path, size, chunks in store.sources():
            print(f"{safe(path)}  ({chunks} chunks, {size} bytes)")
    elif args.command == "remove":
        with store.transaction():
            missing = [p for p in args.paths if not store.remove(str(Path(p).resolve()))]
            if missing:
                raise KbError(f"not in the knowledge base: {', '.join(missing)}")
        print(f"{len(args.paths)} removed")
    return 0


def _ingest(
    args: argparse.Namespace,
    store: Writer,
    kb: StoredKb,
    loaded: configuration.Loaded,
    stop: threading.Event,
) -> int:
    max_bytes = int(args.max_file_mb * 2**20)
    scan = files_under(args.paths, args.follow_symlinks, max_bytes)
    for _, message in scan.skipped:
        if args.strict:
            raise IngestError(f"{message} (--strict)")
        _warn(message)
    try:
        embedder = embedder_for(kb, loaded, timeout_s=60.0)
    except EmbeddingError as exc:
        raise IngestError(f"kb.{args.kb}.embeddings: {exc}") from None
    bar = _progress(sum(f.size for f in scan.files))  # before the warnings: above it
    try:
        summary = ingest(
            store, scan.files, kb.chunk_tokens, kb.overlap_tokens, args.text_field,
            bar.update if bar is not None else None, embedder,
            warn=_warn, stop=stop, strict=args.strict, follow_symlinks=args.follow_symlinks,
            max_bytes=max_bytes,
        )
    finally:
        if bar is not None:
            bar.close()
    for reason, _ in scan.skipped:
        summary.skipped[reason] += 1
    print(summary.line())
    return 0


def _json(hit: Hit) -> str:
    """One hit as JSON; C1 controls and DEL escaped too (JSON leaves them raw)."""
    line = json.dumps(
        {"score": hit.score, "source": hit.source, "heading": hit.heading, "text": hit.text,
         "meta": hit.meta},
        ensure_ascii=False,
    )
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", line)


async def _search(
    name: str, kb: StoredKb, loaded: configuration.Loaded, q: str, k: int
) -> list[Hit]:
    """What the RAG route would find: the same reader, embeddings and all."""
    try:
        embedder_for(kb, loaded, timeout_s=10.0)  # its mistakes said here, not skipped
    except EmbeddingError as exc:
        raise KbError(f"embeddings: {exc}") from None
    reader = bases.reader(name, kb, loaded, embed_timeout_s=10.0)
    try:
        await reader.start()
        return await reader.search(q, k)
    finally:
        await reader.aclose()


def _copy(source: Store, store: Writer, stop: threading.Event) -> int:
    """Every source of a SQLite base, with its vectors, into `store` (not embedded again);
    a source already there with the same content hash is skipped."""
    known = store.hashes()
    copied = skipped = chunks = vectors = 0
    bar = _progress(source.stats()["bytes"])
    try:
        with store.transaction(), store.interrupt_on(stop):
            for item in source.export():
                if stop.is_set():
                    raise KeyboardInterrupt
                if known.get(item.path) == item.digest:
                    skipped += 1
                else:
                    store.replace(item.path, item.digest, item.size, item.chunks,
                                  item.vectors, item.name)
                    copied += 1
                    chunks += len(item.chunks)
                    vectors += len(item.vectors or ())
                if bar is not None:
                    bar.update(item.size)
    finally:
        if bar is not None:
            bar.close()
    print(f"{copied} sources copied ({chunks} chunks, {vectors} vectors), "
          f"{skipped} unchanged, into {safe(store.where)}")
    return 0


def _progress(total: int) -> Any:
    """A progress bar in bytes on a terminal; None when the output goes elsewhere."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)


def _preview(text: str, width: int = 160) -> str:
    text = safe(" ".join(text.split()))
    return text if len(text) <= width else text[: width - 3] + "..."

