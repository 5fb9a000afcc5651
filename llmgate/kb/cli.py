"""`python -m llmgate kb ingest|search|stats|list|remove --config config.toml --kb NAME`."""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
from collections.abc import Iterable
from pathlib import Path

from llmgate import config as configuration
from llmgate.cli import load_config
from llmgate.kb.embeddings import EmbeddingError, embedder_for
from llmgate.kb.ingest import FORMATS, IngestError, files_under, ingest
from llmgate.kb.retriever import Retriever
from llmgate.kb.store import Hit, KbError, Store

EXIT_ERROR = 1
EXIT_CONFIG = 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llmgate kb", description="Build and inspect a knowledge base."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default="config.toml", help="TOML config (%(default)s)")
    common.add_argument("--kb", required=True, help="the [kb.NAME] to use")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser(
        "ingest", parents=[common], help=f"add files or folders ({', '.join(FORMATS)})"
    )
    add.add_argument("paths", nargs="+", metavar="PATH")
    add.add_argument("--text-field", default="text", help=".jsonl: the text's field (text)")
    find = commands.add_parser("search", parents=[common], help="the best chunks for a question")
    find.add_argument("question")
    find.add_argument("--k", type=int, default=5, help="how many (%(default)s)")
    commands.add_parser("stats", parents=[common], help="files, chunks and size")
    commands.add_parser("list", parents=[common], help="the files in the base")
    remove = commands.add_parser("remove", parents=[common], help="take files out")
    remove.add_argument("paths", nargs="+", metavar="PATH")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    loaded = load_config(args.config)
    if loaded is None:
        return EXIT_CONFIG
    kb = loaded.config.kb.get(args.kb)
    if kb is None:
        known = ", ".join(loaded.config.kb) or "none"
        print(f"llmgate: no [kb.{args.kb}] in {args.config} (there are: {known})", file=sys.stderr)
        return EXIT_CONFIG
    if kb.kind != "sqlite" or kb.path is None:
        print(f"llmgate: kb.{args.kb} is a retrieval service (kind = \"{kb.kind}\"): "
              "it has no file to build here", file=sys.stderr)
        return EXIT_CONFIG
    try:
        store = Store(loaded.path(kb.path))
    except KbError as exc:
        print(f"llmgate: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        return _run(args, store, kb, loaded)
    except (IngestError, KbError, sqlite3.Error) as exc:
        what = f"{store.path}: {type(exc).__name__}: {exc}" if isinstance(
            exc, sqlite3.Error
        ) else str(exc)
        print(f"llmgate: {what}; the knowledge base is unchanged", file=sys.stderr)
        return EXIT_ERROR
    finally:
        store.close()


def _run(
    args: argparse.Namespace,
    store: Store,
    kb: configuration.KbConfig,
    loaded: configuration.Loaded,
) -> int:
    if args.command == "ingest":
        files = files_under(args.paths)
        try:
            embedder = embedder_for(kb, loaded, timeout_s=60.0)
        except EmbeddingError as exc:
            raise IngestError(f"kb.{args.kb}.embeddings: {exc}") from None
        summary = ingest(
            store, files, kb.chunk_tokens, kb.overlap_tokens, args.text_field, _progress,
            embedder,
        )
        print(summary.line())
    elif args.command == "search":
        for hit in asyncio.run(_search(store, kb, loaded, args.question, args.k)):
            where = hit.source + (f" > {hit.heading}" if hit.heading else "")
            print(f"{hit.score:7.3f}  {where}\n         {_preview(hit.text)}")
    elif args.command == "stats":
        s = store.stats()
        print(f"{s['files']} files, {s['chunks']} chunks, {s['bytes'] / 2**20:.2f} MB of text, "
              f"{s['file_bytes'] / 2**20:.2f} MB on disk ({store.path})")
    elif args.command == "list":
        for path, size, chunks in store.sources():
            print(f"{path}  ({chunks} chunks, {size} bytes)")
    elif args.command == "remove":
        with store.transaction():
            missing = [p for p in args.paths if not store.remove(str(Path(p).resolve()))]
            if missing:
                raise KbError(f"not in the knowledge base: {', '.join(missing)}")
        print(f"{len(args.paths)} removed")
    return 0


async def _search(
    store: Store, kb: configuration.KbConfig, loaded: configuration.Loaded, q: str, k: int
) -> list[Hit]:
    """What the RAG route would find: the same retriever, embeddings and all."""
    try:
        embedder = embedder_for(kb, loaded, timeout_s=10.0)
    except EmbeddingError as exc:
        raise KbError(f"embeddings: {exc}") from None
    retriever = Retriever("search", store.path, embedder)
    try:
        return await retriever.search(q, k)
    finally:
        await retriever.aclose()


def _progress(files: list[Path]) -> Iterable[Path]:
    """A progress bar on a terminal; nothing when the output goes elsewhere."""
    if not sys.stderr.isatty():
        return files
    from tqdm import tqdm

    return tqdm(files, unit="file", file=sys.stderr)


def _preview(text: str, width: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
