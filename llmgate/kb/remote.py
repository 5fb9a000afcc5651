"""A retrieval service of the operator's own, as a knowledge base (`kind = "http"`).

    POST <url>  {"query": "...", "k": 4}
    200         {"passages": [{"text": "...", "source": "...", "score": 0.8,
                               "heading": "...", "metadata": {...}}]}

`text` is required; the rest may be left out. Anything else (an error status, a timeout,
another shape) is a KbError naming the knowledge base, never the service's own text.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec

from llmgate import http
from llmgate.kb.base import PROBE, Hit, KbError

MAX_ANSWER = 4 * 2**20


class Passage(msgspec.Struct):
    text: str
    source: str = ""
    score: float = 0.0
    heading: str = ""
    metadata: dict[str, Any] = {}


class Passages(msgspec.Struct):
    passages: list[Passage]


_decoder = msgspec.json.Decoder(Passages)


class HttpRetriever:
    """A retrieval service of the operator's own (llmgate.kb.base.Reader)."""

    def __init__(self, name: str, url: str, headers: dict[str, str], timeout_s: float) -> None:
        self.name = name
        self.url = url
        self.headers = {"Content-Type": "application/json", **headers}
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._client = http.OwnSession()

    async def search(self, question: str, k: int, min_score: float = 0.0) -> list[Hit]:
        body = msgspec.json.encode({"query": question, "k": k})
        try:
            raw = await http.fetch(
                self._client.get(), "POST", self.url, MAX_ANSWER, headers=self.headers,
                timeout=self.timeout, data=body,
            )
        except http.HttpError as exc:
            raise KbError(f"kb '{self.name}': the retrieval service {exc}") from None
        try:
            answer = _decoder.decode(raw)
        except msgspec.DecodeError:
            raise KbError(f"kb '{self.name}': the retrieval service's answer is not "
                          '{"passages": [{"text": ...}]}') from None
        hits = [
            Hit(p.score, p.source, p.heading, p.text, p.metadata)
            for p in answer.passages
            if p.score >= min_score
        ]
        return hits[:k]

    async def start(self) -> None:
        """Nothing to open: the connection pool is made by the first search."""

    async def probe(self) -> str:
        found = await self.search(PROBE, 1)
        return f"one retrieval answered ({len(found)} passage{'' if len(found) == 1 else 's'})"

    async def aclose(self) -> None:
        await self._client.aclose()
