"""The engine an [audio.NAME] section names, built once per section."""

from __future__ import annotations

from typing import assert_never

from llmgate.config import AudioConfig, EspeakAudio, FileAudio, Loaded, OpenaiAudio, PiperAudio
from llmgate.tts.base import Engine
from llmgate.tts.espeak import EspeakEngine
from llmgate.tts.file import FileEngine
from llmgate.tts.openai_speech import OpenAISpeechEngine
from llmgate.tts.piper import PiperEngine
from llmgate.upstream.provider import Provider


def engine_for(audio: AudioConfig, loaded: Loaded, providers: dict[str, Provider]) -> Engine:
    match audio:
        case PiperAudio():
            return PiperEngine(loaded.path(audio.voice) if audio.voice else None)
        case EspeakAudio():
            return EspeakEngine(audio.voice)
        case OpenaiAudio():
            return OpenAISpeechEngine(
                providers[audio.provider], audio.model, audio.voice, audio.source_rate
            )
        case FileAudio():
            text = loaded.path(audio.text_file) if audio.text_file else None
            return FileEngine(loaded.path(audio.pcm_file), text, audio.file_rate)
        case _:
            assert_never(audio)
