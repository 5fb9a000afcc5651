"""Dense vectors from any OpenAI-compatible `/embeddings` endpoint, and their fusion with BM25.

Vectors are stored beside the text as float32 BLOBs (this machine's sqlite3 loads no
extensions) and searched as one NumPy matrix held in memory: a dot product over 100,000
vectors of 1,536 floats is a few milliseconds. Reciprocal rank fusion (k = 60) merges the
two rankings without comparing their scores.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import aiohttp
import msgspec
import numpy as np

from llmgate import http
from llmgate.config import Loaded, PostgresKb, SqliteKb

log = logging.getLogger("llmgate.kb")
RRF_K = 60
BATCH = 64
# An answer is bounded by the texts it embeds: a vector of 3,072 floats is ~70 KB as JSON,
# so 256 KB a text leaves room for 8,192 dimensions; a question's answer is at most 320 KB.
MAX_ANSWER_BASE = 64 * 1024
MAX_ANSWER_PER_TEXT = 256 * 1024


class EmbeddingError(Exception):
    """The endpoint failed or answered something else; the message says which."""


class _Item(msgspec.Struct):
    embedding: list[float]
    index: int = 0


class _Answer(msgspec.Struct):
    data: list[_Item]


_decoder = msgspec.json.Decoder(_Answer)


class Embedder:
    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        model: str,
        timeout_s: float,
        name: str = "embeddings",
    ):
        # Errors name the provider, never the URL (it may carry a key in its query).
        self.name = name
        self.url = http.join(base_url, "embeddings")
        self.headers = {**headers, "Content-Type": "application/json"}
        self.model = model
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def embed(self, session: aiohttp.ClientSession, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors, one row a text, float32."""
        rows: list[np.ndarray] = []
        for start in range(0, len(texts), BATCH):
            rows.append(await self._batch(session, list(texts[start : start + BATCH])))
        return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)

    async def _batch(self, session: aiohttp.ClientSession, texts: list[str]) -> np.ndarray:
        body = msgspec.json.encode({"model": self.model, "input": texts})
        limit = MAX_ANSWER_BASE + MAX_ANSWER_PER_TEXT * len(texts)
        try:
            raw = await http.fetch(
                session, "POST", self.url, limit, headers=self.headers, timeout=self.timeout,
                data=body,
            )
        except http.HttpError as exc:
            raise EmbeddingError(f"{self.name}/embeddings {exc}") from None
        try:
            items = sorted(_decoder.decode(raw).data, key=lambda item: item.index)
        except msgspec.DecodeError:
            raise EmbeddingError(f"{self.name}/embeddings sent no embeddings") from None
        if len(items) != len(texts):
            raise EmbeddingError(
                f"{self.name}/embeddings sent {len(items)} embeddings for {len(texts)} texts"
            )
        return normalized(np.array([item.embedding for item in items], dtype=np.float32))

    def embed_sync(self, texts: Sequence[str]) -> np.ndarray:
        """For the `kb` commands, which have no loop of their own."""

        async def run() -> np.ndarray:
            async with http.new_session() as session:
                return await self.embed(session, texts)

        return asyncio.run(run())


def embedder_for(
    kb: SqliteKb | PostgresKb, loaded: Loaded, timeout_s: float
) -> Embedder | None:
    """The embedder a [kb.NAME] names with `embeddings = "provider"`, with its key."""
    if kb.embeddings is None:
        return None
    provider = loaded.config.providers[kb.embeddings]
    unset = loaded.unset_env.get(kb.embeddings)
    if unset:
        raise EmbeddingError(f"provider '{kb.embeddings}' needs {', '.join(unset)} set")
    headers = {**provider.headers, **http.bearer(provider.api_key)}
    name = f"provider '{kb.embeddings}'"
    return Embedder(provider.base_url, headers, kb.embedding_model, timeout_s, name)


async def question_vector(
    embedder: Embedder | None, session: http.OwnSession, question: str, kb: str, instead: str
) -> np.ndarray | None:
    """A question's vector for a reader; None without an embedder, or when the endpoint
    fails (logged: the `instead` list answers alone)."""
    if embedder is None:
        return None
    try:
        return (await embedder.embed(session.get(), [question]))[0]
    except EmbeddingError as exc:
        log.warning("kb '%s': no question vector, %s alone: %s", kb, instead, exc)
        return None


def normalized(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


def nearest(matrix: np.ndarray, query: np.ndarray, n: int) -> np.ndarray:
    """Row numbers of the `n` rows closest to `query` (unit vectors: cosine), best first."""
    if matrix.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    scores = matrix @ query
    n = min(n, len(scores))
    top = np.argpartition(-scores, n - 1)[:n]
    return top[np.argsort(-scores[top])]


def fuse(*rankings: Sequence[int], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: (id, score) best first, score = sum of 1 / (k + rank)."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, key in enumerate(ranking, 1):
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda item: -item[1])
