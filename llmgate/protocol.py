"""OpenAI Chat Completions wire types as msgspec Structs: the request, stream peeks, errors.

The request Structs validate what a caller sent (and give a 400 its `param`); what goes
upstream is built from the caller's own JSON, so these types need not name every field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

Number = float


# --- content parts, tagged by "type" -------------------------------------------------


class TextPart(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class ImageURL(msgspec.Struct):
    url: str
    detail: str | None = None


class ImageURLPart(msgspec.Struct, tag="image_url", tag_field="type"):
    image_url: ImageURL


class ImagePart(msgspec.Struct, tag="image", tag_field="type"):
    """Agora's sample spells an image part "image"; it goes upstream as "image_url"."""

    image_url: ImageURL


class InputAudio(msgspec.Struct):
    data: str
    format: str


class InputAudioPart(msgspec.Struct, tag="input_audio", tag_field="type"):
    input_audio: InputAudio


class FilePart(msgspec.Struct, tag="file", tag_field="type"):
    file: dict[str, Any]


class RefusalPart(msgspec.Struct, tag="refusal", tag_field="type"):
    refusal: str


UserPart = TextPart | ImageURLPart | ImagePart | InputAudioPart | FilePart
AssistantPart = TextPart | RefusalPart


# --- messages, tagged by "role" --------------------------------------------------------


class SystemMessage(msgspec.Struct, tag="system", tag_field="role"):
    content: str | list[TextPart]
    name: str | None = None


class DeveloperMessage(msgspec.Struct, tag="developer", tag_field="role"):
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(msgspec.Struct, tag="user", tag_field="role"):
    content: str | list[UserPart]
    name: str | None = None


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str


class ToolCall(msgspec.Struct):
    id: str
    type: str = "function"
    function: FunctionCall | None = None


class AssistantMessage(msgspec.Struct, tag="assistant", tag_field="role"):
    content: str | list[AssistantPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None
    audio: dict[str, Any] | None = None


class ToolMessage(msgspec.Struct, tag="tool", tag_field="role"):
    content: str | list[TextPart]
    tool_call_id: str


Message = SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage


# --- the request -------------------------------------------------------------------------


class FunctionDef(msgspec.Struct):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct):
    type: str = "function"
    function: FunctionDef | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class ChatRequest(msgspec.Struct):
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    model: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    n: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    seed: int | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prediction: dict[str, Any] | None = None
    # Agora's engine: {appId, userId, channel}; never forwarded upstream.
    context: dict[str, Any] | None = None


# Top-level fields of OpenAI's Chat Completions request, typed above or not: these go
# upstream. Anything else a caller sends (Agora's merged `llm.params`) becomes turn
# metadata unless a provider's `forward_fields` names it.
OPENAI_PARAMS = frozenset(
    {f for f in ChatRequest.__struct_fields__ if f != "context"}
    | {
        "functions",
        "function_call",
        "web_search_options",
        "verbosity",
        "prompt_cache_key",
        "prompt_cache_retention",
        "safety_identifier",
    }
)

# --- what the relay peeks at in upstream chunks --------------------------------------------


class ChoicePeek(msgspec.Struct):
    finish_reason: str | None = None


class ChunkPeek(msgspec.Struct):
    """The few fields of a chat.completion(.chunk) that llmgate looks at."""

    choices: list[ChoicePeek] = []
    usage: dict[str, Any] | None = None
    error: Any = None


# --- what a stage sees of each upstream chunk ---------------------------------------------


class FunctionDeltaView(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class ToolCallDeltaView(msgspec.Struct):
    index: int = 0
    id: str | None = None
    type: str | None = None
    function: FunctionDeltaView | None = None


class DeltaView(msgspec.Struct):
    # Loosely typed where providers differ (content as a list of parts, say): a stage acts
    # on the shapes it knows and passes the rest on untouched, never fails the chunk.
    role: Any = None
    content: Any = None
    refusal: Any = None
    tool_calls: list[ToolCallDeltaView] | None = None
    audio: Any = None
    annotations: Any = None  # url_citation and the like: a non-streamed answer keeps them


class ChoiceView(msgspec.Struct):
    index: int = 0
    delta: DeltaView | None = None
    finish_reason: str | None = None
    logprobs: Any = None


class ChunkView(msgspec.Struct):
    """A chat.completion.chunk as stages read it: what they act on, nothing else decoded."""

    id: Any = None
    created: Any = None
    model: Any = None
    system_fingerprint: Any = None
    service_tier: Any = None
    choices: list[ChoiceView] = []
    usage: dict[str, Any] | None = None
    error: Any = None


class UpstreamErrorBody(msgspec.Struct):
    """An upstream's error envelope; anything else in it is ignored."""

    error: dict[str, Any] | str | None = None
    message: str | None = None


# --- errors we send ------------------------------------------------------------------------


class ErrorObject(msgspec.Struct, omit_defaults=False):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorObject


request_decoder = msgspec.json.Decoder(ChatRequest)
generic_decoder = msgspec.json.Decoder()
chunk_decoder = msgspec.json.Decoder(ChunkPeek)
view_decoder = msgspec.json.Decoder(ChunkView)
encoder = msgspec.json.Encoder()


_UNKNOWN = re.compile(r"Object contains unknown field `(.+)`")
_MISSING = re.compile(r"Object missing required field `(.+)`")


def error_path(exc: msgspec.ValidationError) -> tuple[str, str]:
    """(what is wrong, where) from msgspec's "... - at `$.a[0].b`".

    A missing or unknown field is named in the path itself (`$.messages`), as a caller
    looks for the field, not for the object that lacks it.
    """
    text, _, at = str(exc).partition(" - at `")
    path = at.rstrip("`") or "$"
    for pattern, what in ((_MISSING, "is required"), (_UNKNOWN, "is not a known field")):
        match = pattern.fullmatch(text)
        if match:
            return what, f"{path}.{match.group(1)}"
    return text, path
