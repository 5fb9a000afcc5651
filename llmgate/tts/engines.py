"""The engine an [audio.NAME] section names, built once per section."""

from __future__ import annotations

from llmgate.config import AudioConfig, Loaded
from llmgate.tts.base import Engine
from llmgate.tts.espeak import EspeakEngine
from llmgate.tts.file import FileEngine
from llmgate.tts.openai_speech import OpenAISpeechEngine
from llmgate.tts.piper import PiperEngine
from llmgate.upstream.provider import Provider


def engine_for(audio: AudioConfig, loaded: Loaded, providers: dict[str, Provider]) -> Engine:
    if audio.engine == "espeak":
        return EspeakEngine(audio.voice)
    if audio.engine == "openai":
        assert audio.provider is not None  # the config checked it
        return OpenAISpeechEngine(
            providers[audio.provider], audio.model, audio.voice, audio.source_rate
        )
    if audio.engine == "file":
        assert audio.pcm_file is not None
        text = loaded.path(audio.text_file) if audio.text_file else None
        return FileEngine(loaded.path(audio.pcm_file), text, audio.file_rate)
    return PiperEngine(loaded.path(audio.voice) if audio.voice else None)
