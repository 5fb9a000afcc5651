"""A knowledge base in PostgreSQL: the lexical index a `tsvector` with GIN, the vectors pgvector's.

    {table}_sources  one row a source: path, content hash, size, chunk count, name
    {table}          the chunks: source, order, heading, text, meta (jsonb), and
                     tsv  a generated tsvector in `language` (text weighted A, heading B), GIN
                     vec  vector(N), added with the first vectors; HNSW (cosine) once filled
    llmgate_kb_meta  one row a base: its schema version, language and vector dimensions

Several bases share a database by their `table`. The schema is made on first use; a base
made by a newer llmgate is refused. The server reads through an asyncpg pool (PgReader):
lexical search ranks a bounded candidate set with `ts_rank_cd` (never every match), the
dense list comes from HNSW, and the two are fused as SQLite's are (llmgate.kb.embeddings).
A query slower than `timeout_ms` is "nothing found"; a barge-in cancels the query on the
server. The `kb` commands write through PgWriter (each source in one transaction, rows by
COPY). Messages name `postgresql host:port/db table T`, never the DSN.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec
import numpy as np

from llmgate.config import PostgresKb
from llmgate.http import OwnSession
from llmgate.kb.base import PROBE, Exported, Hit, KbError, KbMissing, holding
from llmgate.kb.chunking import Chunk
from llmgate.kb.embeddings import Embedder, fuse, question_vector
from llmgate.kb.store import distinct, question_words

log = logging.getLogger("llmgate.kb")
_T = TypeVar("_T")

SCHEMA_VERSION = 1
META = "llmgate_kb_meta"
CANDIDATES = 50  # each list's length before fusion, as SQLite's
# Matches ranked at most: an OR of a question's words can match most of a big base, and
# ranking every match takes seconds at a million rows. Chunks holding every word come first.
LEXICAL_POOL = 1000
_encode = msgspec.json.Encoder().encode
META_S = 30.0  # a server's reader reads the base's row again this often (a kb ingest's vectors)
RECONNECT_S = 1.0  # a base that could not be reached is tried again at most this often
CONNECT_TIMEOUT_S = 5.0  # opening the pool, off any turn


def describe(kb: PostgresKb) -> str:
    """Where a base is, for a message: "postgresql host:port/db table T" (no user, no
    password: the DSN is never shown)."""
    host, port, db = _address(kb.dsn)
    return f"postgresql {host}:{port}/{db} table {kb.table}"


def _address(dsn: str) -> tuple[str, int | str, str]:
    try:
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        host = parts.hostname or query.get("host", ["localhost"])[0]
        port: int | str = parts.port or query.get("port", [5432])[0]
    except ValueError:
        return "?", "?", "?"
    db = unquote(parts.path.lstrip("/")) or query.get("dbname", [""])[0] or "postgres"
    return host, port, db


def _secret(dsn: str) -> str | None:
    try:
        return urlsplit(dsn).password
    except ValueError:
        return None


def lexical_queries(question: str) -> tuple[str, str] | None:
    """(every word, any word) for `websearch_to_tsquery`, of the words SQLite's search
    takes (store.question_words); None for a question of filler only."""
    unique = question_words(question)
    if not unique:
        return None
    return " ".join(unique), " or ".join(unique)


class _Names:
    """A base's SQL names (the table is a checked identifier: config's _IDENTIFIER)."""

    def __init__(self, kb: PostgresKb) -> None:
        self.table = kb.table
        self.chunks = f'"{kb.table}"'
        self.sources = f'"{kb.table}_sources"'
        self.tsv_index = f"{kb.table}_tsv"
        self.vec_index = f"{kb.table}_vec"
        self.language = kb.language

    def schema(self) -> list[str]:
        lang = f"'{self.language}'::regconfig"
        return [
            f"CREATE TABLE IF NOT EXISTS {META} (base text PRIMARY KEY, version integer NOT "
            "NULL, language text NOT NULL, dims integer)",
            f"CREATE TABLE IF NOT EXISTS {self.sources} (path text PRIMARY KEY, hash text NOT "
            "NULL, bytes bigint NOT NULL, chunks integer NOT NULL, ingested double precision "
            "NOT NULL, name text NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS {self.chunks} (id bigserial PRIMARY KEY, source text "
            "NOT NULL, ord integer NOT NULL, heading text NOT NULL, text text NOT NULL, "
            f"meta jsonb, tsv tsvector GENERATED ALWAYS AS (setweight(to_tsvector({lang}, "
            f"text), 'A') || setweight(to_tsvector({lang}, heading), 'B')) STORED)",
            f'CREATE INDEX IF NOT EXISTS "{self.table}_source" ON {self.chunks} (source)',
            f'CREATE INDEX IF NOT EXISTS "{self.tsv_index}" ON {self.chunks} USING gin (tsv)',
        ]

    def lexical(self, dense: bool) -> str:
        """$1 language, $2 every word, $3 any word[, $4 the question's vector]: the
        lexical ids best first, then (dense) the nearest ids, as (list, id) rows."""
        sql = (
            "WITH q AS (SELECT websearch_to_tsquery($1::regconfig, $2) AS every, "
            "websearch_to_tsquery($1::regconfig, $3) AS anyw), "
            f"pool AS ((SELECT c.id, c.tsv FROM {self.chunks} c, q WHERE c.tsv @@ q.every "
            f"LIMIT {LEXICAL_POOL}) UNION ALL (SELECT c.id, c.tsv FROM {self.chunks} c, q "
            f"WHERE c.tsv @@ q.anyw LIMIT {LEXICAL_POOL})), "
            "lex AS (SELECT pool.id, max(ts_rank_cd(pool.tsv, q.anyw)) AS score FROM pool, q "
            f"GROUP BY pool.id ORDER BY score DESC, pool.id LIMIT {CANDIDATES}) "
            "SELECT 0 AS list, id, score FROM lex"
        )
        if dense:  # the question's vector as pgvector's text ("[0.1,...]")
            sql += (
                f" UNION ALL (SELECT 1, id, 0 FROM {self.chunks} "
                f"ORDER BY vec <=> $4::text::vector LIMIT {CANDIDATES})"
            )
        return sql

    def rows(self) -> str:
        return (
            f"SELECT c.id, s.name, c.heading, c.text, c.meta FROM {self.chunks} c "
            f"JOIN {self.sources} s ON s.path = c.source WHERE c.id = any($1::bigint[])"
        )


# pgvector's binary form: dimensions and a reserved word (uint16 each), then float4s, all
# big-endian; llmgate keeps vectors as little-endian float32 bytes (SQLite's BLOBs).
def _vector_in(value: bytes | np.ndarray) -> bytes:
    array = np.frombuffer(value, dtype="<f4") if isinstance(value, bytes) else value
    return struct.pack(">HH", array.shape[0], 0) + array.astype(">f4").tobytes()


def _vector_out(data: bytes) -> bytes:
    dims = struct.unpack_from(">H", data)[0]
    return np.frombuffer(data, dtype=">f4", count=dims, offset=4).astype("<f4").tobytes()


async def _setup(conn: Any) -> None:
    """A new connection's codec for pgvector's type (when the extension is there)."""
    if await conn.fetchval("SELECT 1 FROM pg_type WHERE typname = 'vector'"):
        await conn.set_type_codec("vector", schema="public", encoder=_vector_in,
                                  decoder=_vector_out, format="binary")


class _Meta:
    def __init__(self, version: int, language: str, dims: int | None) -> None:
        self.version, self.language, self.dims = version, language, dims


async def _read_meta(conn: Any, table: str) -> _Meta | None:
    """The base's row of llmgate_kb_meta; None when there is none (never made)."""
    if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", META):
        return None
    row = await conn.fetchrow(
        f"SELECT version, language, dims FROM {META} WHERE base = $1", table
    )
    if row is None:
        return None
    if row["version"] > SCHEMA_VERSION:
        raise KbError(
            f"table {table} was made by a newer llmgate (schema {row['version']}; this one "
            f"knows {SCHEMA_VERSION}): upgrade llmgate, or use another table"
        )
    return _Meta(row["version"], row["language"], row["dims"])


class _Failures:
    """Driver errors as KbErrors naming the base, with the DSN's password nowhere."""

    def __init__(self, name: str, kb: PostgresKb) -> None:
        self.prefix = f"kb '{name}': {describe(kb)}"
        self.secret = _secret(kb.dsn)
        self.dsn = kb.dsn

    def __call__(self, exc: BaseException, doing: str = "") -> KbError:
        if isinstance(exc, KbError):
            return KbError(f"{self.prefix}: {self._clean(str(exc))}")
        reason = self._clean(f"{type(exc).__name__}: {exc}".rstrip(": "))
        if type(exc).__name__ == "UndefinedFileError" and "vector" in str(exc):
            reason = ("pgvector is not installed on this server (most managed PostgreSQL "
                      "offer it: CREATE EXTENSION vector, as a superuser or with the "
                      "provider's extension settings)")
        elif isinstance(exc, OSError | TimeoutError):
            reason = f"cannot connect ({reason})"
        return KbError(f"{self.prefix}: {doing + ': ' if doing else ''}{reason}")

    def _clean(self, text: str) -> str:
        if self.dsn in text:
            text = text.replace(self.dsn, "<dsn>")
        if self.secret and self.secret in text:
            text = text.replace(self.secret, "***")
        return text


def _errors() -> tuple[type[BaseException], ...]:
    import asyncpg

    return (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class PgReader:
    """A PostgreSQL base, searched from the server (llmgate.kb.base.Reader)."""

    def __init__(self, name: str, kb: PostgresKb, embedder: Embedder | None = None) -> None:
        self.name = name
        self.kb = kb
        self.embedder = embedder
        self.names = _Names(kb)
        self._failed = _Failures(name, kb)
        self._pool: Any = None
        self._meta: _Meta | None = None
        self._meta_until = 0.0  # read again after this (monotonic)
        self._opening: asyncio.Task | None = None
        self._next_try = 0.0
        self._down: str | None = None  # why it could not be reached, once logged
        self._client = OwnSession()  # the question's vector, if there is an embedder
        self._mismatch_logged = False
        self.delay_s = 0.0  # a test hook: each search first sleeps this long on the server

    async def start(self) -> None:
        """The pool, opened off any turn; a server that is down is logged, and tried again
        by the searches that find it so (at most once a second, in the background)."""
        await self._open()

    async def _open(self) -> None:
        import asyncpg

        self._next_try = time.monotonic() + RECONNECT_S
        try:
            pool = await asyncpg.create_pool(
                self.kb.dsn, min_size=1, max_size=self.kb.pool_max, timeout=CONNECT_TIMEOUT_S,
                init=self._init, max_inactive_connection_lifetime=300,
                server_settings={"application_name": f"llmgate kb {self.name}"},
            )
        except _errors() as exc:
            self._note_down(self._failed(exc))
            return
        except ValueError as exc:  # a DSN asyncpg cannot read (never echoed)
            self._note_down(KbError(f"{self._failed.prefix}: its dsn cannot be read "
                                    f"({type(exc).__name__})"))
            return
        try:
            async with pool.acquire() as conn:
                await self._read_meta(conn)
        except (KbError, *_errors()) as exc:
            await pool.close()
            self._note_down(self._failed(exc))
            return
        self._pool = pool
        if self._down is not None:
            log.info("kb '%s': %s is reachable again", self.name, describe(self.kb))
        self._down = None

    def _note_down(self, exc: KbError) -> None:
        if self._down is None:
            log.warning("%s; its routes answer as if nothing was found until it is back", exc)
        self._down = str(exc)

    async def _init(self, conn: Any) -> None:
        # HNSW's candidate list (pgvector's own setting; a placeholder until it loads)
        await conn.execute(f"SET hnsw.ef_search = {int(self.kb.ef_search)}")
        # a query the server runs on past the turn's bound (its cancel lost) ends anyway
        await conn.execute(f"SET statement_timeout = {int(self.kb.timeout_ms) + 1000}")

    def _reopen(self) -> None:
        """Try the server again in the background (a turn never waits on a connect)."""
        if (self._opening is None or self._opening.done()) and time.monotonic() >= self._next_try:
            self._opening = asyncio.ensure_future(self._open())

    async def search(self, question: str, k: int, min_score: float = 0.0) -> list[Hit]:
        queries = lexical_queries(question)
        vector = await self._query_vector(question)
        if queries is None and vector is None:
            return []
        if self._pool is None:
            self._reopen()
            raise KbError(self._down or f"{self._failed.prefix}: not connected yet")
        try:
            async with asyncio.timeout(self.kb.timeout_ms / 1000):
                async with self._pool.acquire() as conn:
                    return await self._search(conn, queries, vector, k, min_score)
        except TimeoutError:
            raise KbError(f"{self._failed.prefix}: no answer within {self.kb.timeout_ms} ms "
                          "(timeout_ms)") from None
        except KbError:
            raise
        except _errors() as exc:
            raise self._failed(exc, "search") from None

    async def _search(
        self, conn: Any, queries: tuple[str, str] | None, vector: np.ndarray | None, k: int,
        min_score: float,
    ) -> list[Hit]:
        if self.delay_s:
            await conn.execute("SELECT pg_sleep($1)", self.delay_s)
        # made since the pool opened? given vectors since (their dimensions)?
        stale = self._meta is None or time.monotonic() >= self._meta_until
        if stale and await self._read_meta(conn) is None:
            raise KbMissing(f"{self._failed.prefix}: no such base yet (run `kb ingest`)")
        dense = vector is not None and self._dense_ok(vector)
        every, anyw = queries if queries is not None else ("", "")
        args: list[Any] = [self._meta.language, every, anyw]
        if dense:
            args.append(_encode(vector.tolist()).decode())
        lexical: list[tuple[int, float]] = []
        near: list[int] = []
        for row in await conn.fetch(self.names.lexical(dense), *args):
            if row["list"] == 0:
                if row["score"] >= min_score:
                    lexical.append((row["id"], float(row["score"])))
            else:
                near.append(row["id"])
        ranked = fuse([i for i, _ in lexical], near)[: 2 * k] if dense else lexical[: 2 * k]
        if not ranked:
            return []
        rows = {r["id"]: r for r in await conn.fetch(self.names.rows(), [i for i, _ in ranked])}
        found = [
            Hit(score, rows[i]["name"], rows[i]["heading"], rows[i]["text"],
                json.loads(rows[i]["meta"]) if rows[i]["meta"] else {})
            for i, score in ranked if i in rows
        ]
        return distinct(found, k)

    async def _read_meta(self, conn: Any) -> _Meta | None:
        """The base's row, kept for META_S."""
        self._meta = await _read_meta(conn, self.kb.table)
        self._meta_until = time.monotonic() + META_S
        return self._meta

    def _dense_ok(self, vector: np.ndarray) -> bool:
        dims = self._meta.dims if self._meta is not None else None
        if dims is None:
            return False
        if dims != vector.shape[0]:
            if not self._mismatch_logged:
                self._mismatch_logged = True
                log.warning("kb '%s': its vectors have %d dimensions, the question's %d "
                            "(another embedding model?): lexical alone; ingest again",
                            self.name, dims, vector.shape[0])
            return False
        return True

    async def _query_vector(self, question: str) -> np.ndarray | None:
        return await question_vector(self.embedder, self._client, question, self.name,
                                     "lexical")

    async def probe(self) -> str:
        """For `check`: what the base holds, after one search of the server's own kind."""
        if self._pool is None:
            await self._open()
            if self._pool is None:
                raise KbError(self._down or self._failed.prefix)
        try:
            async with self._pool.acquire() as conn:
                if await self._read_meta(conn) is None:
                    raise KbMissing(f"{self._failed.prefix} does not exist yet")
                files, chunks = await conn.fetchrow(
                    f"SELECT count(*), coalesce(sum(chunks), 0) FROM {self.names.sources}"
                )
                await self._search(conn, lexical_queries(PROBE), None, 1, 0.0)
        except KbError:
            raise
        except _errors() as exc:
            raise self._failed(exc) from None
        if not chunks:
            raise KbMissing(f"{self._failed.prefix} is empty")
        return holding(chunks, files)

    async def aclose(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
        await self._client.aclose()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 5)
            except (TimeoutError, *_errors()):
                pool.terminate()


class PgWriter:
    """A PostgreSQL base opened for writing (llmgate.kb.base.Writer), for the `kb` commands:
    blocking calls, run on a loop of its own on a thread of its own."""

    def __init__(self, name: str, kb: PostgresKb) -> None:
        self.name = name
        self.kb = kb
        self.where = describe(kb)
        self.names = _Names(kb)
        self._failed = _Failures(name, kb)
        self._stop: threading.Event | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"kb-{name}")
        self._thread.start()
        self._conn: Any = None
        self._dims: int | None = None
        self._indexed = True  # the vectors have their HNSW index (made by close if not)
        self._wrote = False
        self._interrupted = False
        try:
            self._call(self._connect, "open")
        except BaseException:
            self.close()
            raise

    def _call(self, make: Callable[[], Awaitable[_T]], doing: str = "") -> _T:
        """Run a coroutine on the writer's loop; Ctrl-C (`interrupt_on`'s event) cancels it,
        and asyncpg cancels its statement on the server."""
        future = asyncio.run_coroutine_threadsafe(make(), self._loop)  # type: ignore[arg-type]
        try:
            while True:
                try:
                    return future.result(timeout=0.1)
                except TimeoutError:
                    if self._stop is not None and self._stop.is_set():
                        raise KeyboardInterrupt from None
        except KeyboardInterrupt:  # the event, or SIGINT's handler raising here
            future.cancel()
            self._interrupted = True  # (close then builds nothing)
            raise
        except KbError as exc:
            raise self._failed(exc) from None
        except _errors() as exc:
            raise self._failed(exc, doing) from None

    async def _connect(self) -> None:
        import asyncpg

        try:
            self._conn = await asyncpg.connect(
                self.kb.dsn, timeout=CONNECT_TIMEOUT_S,
                server_settings={"application_name": f"llmgate kb {self.name}"},
            )
        except ValueError as exc:
            raise KbError(f"its dsn cannot be read ({type(exc).__name__})") from None
        conn = self._conn
        if self.kb.embeddings is not None:
            await self._extension()
        meta = await _read_meta(conn, self.kb.table)
        if meta is None:
            try:
                await conn.fetchval("SELECT $1::regconfig", self.kb.language)
            except Exception as exc:
                raise KbError(f"no text-search configuration {self.kb.language!r} on this "
                              "server (language; SELECT cfgname FROM pg_ts_config lists them)"
                              ) from exc
            async with conn.transaction():
                # one writer makes a base at a time (two first ingests at once)
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", META)
                for statement in self.names.schema():
                    await conn.execute(statement)
                await conn.execute(
                    f"INSERT INTO {META} (base, version, language) VALUES ($1, $2, $3) "
                    "ON CONFLICT (base) DO NOTHING",
                    self.kb.table, SCHEMA_VERSION, self.kb.language,
                )
            meta = await _read_meta(conn, self.kb.table)
            assert meta is not None
        elif meta.language != self.kb.language:
            raise KbError(f"table {self.kb.table} is indexed in {meta.language!r}, not "
                          f"{self.kb.language!r} (language): use another table for another "
                          "language")
        self._dims = meta.dims
        if meta.dims is not None:
            self._indexed = bool(await conn.fetchval(
                "SELECT 1 FROM pg_indexes WHERE indexname = $1", self.names.vec_index
            ))
        await _setup(conn)

    async def _extension(self) -> None:
        if not await self._conn.fetchval("SELECT 1 FROM pg_extension WHERE extname = 'vector'"):
            await self._conn.execute("CREATE EXTENSION IF NOT EXISTS vector")

    async def _vectors_of(self, dims: int) -> None:
        """The `vec` column of `dims` dimensions, made with the first vectors."""
        if self._dims == dims:
            return
        if self._dims is not None:
            raise KbError(f"its vectors have {self._dims} dimensions, these {dims} (another "
                          "embedding model?): use another table, or empty this one")
        await self._extension()
        await _setup(self._conn)
        async with self._conn.transaction():
            await self._conn.execute(
                f"ALTER TABLE {self.names.chunks} ADD COLUMN IF NOT EXISTS vec vector({dims})"
            )
            await self._conn.execute(f"UPDATE {META} SET dims = $1 WHERE base = $2",
                                     dims, self.kb.table)
        self._dims = dims
        self._indexed = False

    def close(self) -> None:
        """The vectors' HNSW index is built here, once, after the rows are in (much faster
        than row by row); a writer killed before it leaves exact search, still right."""
        try:
            self._call(self._settled)  # a statement cancelled by Ctrl-C ends first
            if self._conn is not None:
                if self._wrote and not self._interrupted:
                    self._call(self._tidy, "tidy the indexes")
                self._call(self._conn.close)
        except (KbError, KeyboardInterrupt):
            pass
        finally:
            self._conn = None
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            if not self._thread.is_alive():
                self._loop.close()

    async def _settled(self) -> None:
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others:
            await asyncio.wait(others, timeout=5)

    async def _tidy(self) -> None:
        """After writes: the GIN index's pending list merged (rows COPYed in wait there, and
        every search would scan it: 2 ms a search at 100k chunks until autovacuum came), the
        planner's statistics renewed, and the vectors' HNSW index built if missing."""
        import asyncpg

        await self._conn.execute("SET maintenance_work_mem = '256MB'")
        if not self._indexed:
            await self._conn.execute(
                f'CREATE INDEX IF NOT EXISTS "{self.names.vec_index}" ON {self.names.chunks} '
                "USING hnsw (vec vector_cosine_ops)"
            )
            self._indexed = True
        try:  # (the table's owner's to do; autovacuum does both in time otherwise)
            await self._conn.execute("SELECT gin_clean_pending_list($1::regclass)",
                                     f'"{self.names.tsv_index}"')
            await self._conn.execute(f"ANALYZE {self.names.chunks}")
        except asyncpg.InsufficientPrivilegeError:
            pass

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Each source's `replace` (and each `remove`) is a transaction of its own: an
        interrupted command leaves every source whole or absent, and keeps those done."""
        yield

    @contextmanager
    def interrupt_on(self, stop: threading.Event) -> Iterator[None]:
        self._stop = stop
        try:
            yield
        finally:
            self._stop = None

    def hashes(self) -> dict[str, str]:
        async def run() -> dict[str, str]:
            rows = await self._conn.fetch(f"SELECT path, hash FROM {self.names.sources}")
            return {r["path"]: r["hash"] for r in rows}

        return self._call(run)

    def replace(
        self,
        source: str,
        digest: str,
        size: int,
        chunks: Sequence[Chunk],
        vecs: Sequence[bytes] | None = None,
        name: str | None = None,
    ) -> None:
        async def run() -> None:
            if vecs:
                await self._vectors_of(len(vecs[0]) // 4)
            columns = ["source", "ord", "heading", "text", "meta"]
            if vecs:
                columns.append("vec")
            records = [
                (source, i, c.heading, c.text, json.dumps(c.meta) if c.meta else None,
                 *((vecs[i],) if vecs else ()))
                for i, c in enumerate(chunks)
            ]
            self._wrote = True
            async with self._conn.transaction():
                await self._remove(source)
                if records:
                    await self._conn.copy_records_to_table(
                        self.kb.table, records=records, columns=columns
                    )
                await self._conn.execute(
                    f"INSERT INTO {self.names.sources} (path, hash, bytes, chunks, ingested, "
                    "name) VALUES ($1, $2, $3, $4, $5, $6)",
                    source, digest, size, len(chunks), time.time(),
                    name or source.rpartition("/")[2],
                )

        self._call(run, f"write {source}")

    async def _remove(self, source: str) -> bool:
        await self._conn.execute(f"DELETE FROM {self.names.chunks} WHERE source = $1", source)
        done = await self._conn.execute(
            f"DELETE FROM {self.names.sources} WHERE path = $1", source
        )
        return done != "DELETE 0"

    def remove(self, source: str) -> bool:
        async def run() -> bool:
            self._wrote = True
            async with self._conn.transaction():
                return await self._remove(source)

        return self._call(run, f"remove {source}")

    def without_vectors(self) -> list[tuple[int, str]]:
        async def run() -> list[tuple[int, str]]:
            where = "" if self._dims is None else " WHERE vec IS NULL"
            rows = await self._conn.fetch(
                f"SELECT id, text FROM {self.names.chunks}{where} ORDER BY id"
            )
            return [(r["id"], r["text"]) for r in rows]

        return self._call(run)

    def set_vectors(self, rows: Sequence[tuple[bytes, int]]) -> None:
        async def run() -> None:
            if not rows:
                return
            await self._vectors_of(len(rows[0][0]) // 4)
            self._wrote = True
            async with self._conn.transaction():
                await self._conn.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS llmgate_vectors (id bigint, vec vector) "
                    "ON COMMIT DELETE ROWS"
                )
                await self._conn.copy_records_to_table(
                    "llmgate_vectors", records=[(i, v) for v, i in rows], columns=["id", "vec"]
                )
                await self._conn.execute(
                    f"UPDATE {self.names.chunks} c SET vec = v.vec FROM llmgate_vectors v "
                    "WHERE c.id = v.id"
                )

        self._call(run, "store vectors")

    def sources(self) -> list[tuple[str, int, int]]:
        async def run() -> list[tuple[str, int, int]]:
            rows = await self._conn.fetch(
                f"SELECT path, bytes, chunks FROM {self.names.sources} ORDER BY path"
            )
            return [(r["path"], r["bytes"], r["chunks"]) for r in rows]

        return self._call(run)

    def stats(self) -> dict[str, int]:
        async def run() -> dict[str, int]:
            files, chunks, size = await self._conn.fetchrow(
                "SELECT count(*), coalesce(sum(chunks), 0), coalesce(sum(bytes), 0) "
                f"FROM {self.names.sources}"
            )
            disk = await self._conn.fetchval(
                "SELECT pg_total_relation_size($1::regclass) + "
                "pg_total_relation_size($2::regclass)",
                self.names.chunks, self.names.sources,
            )
            return {"files": files, "chunks": chunks, "bytes": int(size), "file_bytes": disk}

        return self._call(run)

    def export(self) -> Iterator[Exported]:
        sources = self._call(self._exported_sources)
        for path, digest, size, name in sources:
            chunks, vecs = self._call(lambda path=path: self._exported_chunks(path))
            whole = bool(vecs) and all(v is not None for v in vecs)
            yield Exported(path, digest, size, name, chunks, vecs if whole else None)

    async def _exported_sources(self) -> list[tuple[str, str, int, str]]:
        rows = await self._conn.fetch(
            f"SELECT path, hash, bytes, name FROM {self.names.sources} ORDER BY path"
        )
        return [(r["path"], r["hash"], r["bytes"], r["name"]) for r in rows]

    async def _exported_chunks(self, path: str) -> tuple[list[Chunk], list[bytes | None]]:
        vec = "vec" if self._dims is not None else "NULL::bytea AS vec"
        rows = await self._conn.fetch(
            f"SELECT heading, text, meta, {vec} FROM {self.names.chunks} WHERE source = $1 "
            "ORDER BY ord", path,
        )
        chunks = [Chunk(r["heading"], r["text"], json.loads(r["meta"]) if r["meta"] else {})
                  for r in rows]
        return chunks, [r["vec"] for r in rows]
