"""Any OpenAI-compatible `/audio/speech` endpoint as a speech engine (OpenAI, Kokoro-FastAPI,
openedai-speech, ...): raw PCM16 (`response_format: "pcm"`, 24 kHz on OpenAI) read as it
streams, so the first frames go out before the sentence is fully synthesised.

The endpoint is configured like any provider (`provider = "openai"`): its base URL, its
key and headers, never sent on to another host (a redirect is a failure). Failures are said
the way provider failures are (the status, the provider's message with keys redacted, its
error body read to a bound), never with the URL. A cancelled synthesis (the caller barged
in) closes the connection rather than reading the rest of the sentence.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import msgspec

from llmgate import http
from llmgate.errors import ProviderNotReady
from llmgate.tts.base import EngineError
from llmgate.upstream.provider import Provider

READ = 16 * 1024


class OpenAISpeechEngine:
    name = "openai"
    first_words: int | None = None

    def __init__(self, provider: Provider, model: str, voice: str, rate: int) -> None:
        self.provider = provider
        self.url = http.join(provider.config.base_url, "audio/speech")
        self.model = model
        self.voice = voice or "alloy"
        self.rate = rate
        self.headers = {**provider.headers(False, None), "Accept": "*/*"}
        config = provider.config
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=config.connect_timeout_s,
            sock_read=config.idle_timeout_s,
        )
        self._client = http.OwnSession()

    async def start(self) -> None:
        pass  # the client opens on the first sentence

    async def aclose(self) -> None:
        await self._client.aclose()

    def check(self) -> None:
        try:
            self.provider.check_ready()  # its key's ${VAR} is set
        except ProviderNotReady as exc:
            raise EngineError(exc.message) from None

    async def synthesize(self, text: str) -> AsyncIterator[tuple[int, bytes]]:
        """(sample rate, PCM16 mono) pieces of `text` spoken, as the endpoint sends them."""
        self.check()
        body = msgspec.json.encode(
            {"model": self.model, "voice": self.voice, "input": text, "response_format": "pcm"}
        )
        try:
            # A barge-in or a failure closes the connection rather than read the rest.
            async with http.request(
                self._client.get(), "POST", self.url, headers=self.headers,
                timeout=self.timeout, data=body,
            ) as resp:
                kind = resp.headers.get("Content-Type", "")
                if kind.startswith(("application/json", "text/")):
                    raise EngineError(f"provider '{self.provider.name}' sent {kind}, not audio")
                while data := await resp.content.read(READ):
                    yield self.rate, data
        except http.StatusError as exc:  # the provider's message, its secrets redacted
            error = self.provider.status_error(exc.status, exc.headers, exc.body)
            raise EngineError(error.message) from None
        except http.HttpError as exc:
            raise EngineError(f"provider '{self.provider.name}' {exc}") from None
