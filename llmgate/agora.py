"""What Agora's Conversational AI engine adds to an OpenAI request, read in one place.

Besides the OpenAI fields, the engine sends a `context` object (appId, channel, user),
whatever the agent's `llm.params` holds merged in at the top level, and on each message its
`turn_id`, `timestamp` and `metadata` (../shared/reference/agora-contract.md). They never
go upstream: they become the turn's metadata.
"""

from __future__ import annotations

import hashlib
from typing import Any

MAX_CHANNEL_KEY = 160  # characters of "app/channel" kept (a longer one ends in a hash)

# The engine's own fields on a message (a provider would refuse them).
ENGINE_MESSAGE_FIELDS = ("turn_id", "timestamp", "metadata")


def take_engine_fields(raw: dict[str, Any], forward: frozenset[str]) -> dict[str, Any]:
    """The engine's fields taken out of a request body (`raw`, changed in place: what is
    left goes upstream): every top-level field a provider is not sent (not in `forward`),
    and the last message `turn_id`. Agora's `image` content parts become OpenAI's
    `image_url`."""
    metadata: dict[str, Any] = {}
    for key in [k for k in raw if k not in forward]:
        metadata[key] = raw.pop(key)
    turn_id = None
    for message in raw["messages"]:
        for key in ENGINE_MESSAGE_FIELDS:
            if key in message:
                value = message.pop(key)
                if key == "turn_id":
                    turn_id = value
        content = message.get("content")
        if type(content) is list:
            for part in content:
                if type(part) is dict and part.get("type") == "image":
                    part["type"] = "image_url"
    if turn_id is not None:
        metadata["turn_id"] = turn_id
    return metadata


def own_phrases_out(messages: list[Any], phrases: tuple[str, ...]) -> None:
    """llmgate's own phrases (a waiting phrase, a tool filler, the apology) taken out of the
    assistant messages of the history the engine sends back (its memory holds what the
    agent said, and so what llmgate said): matched at the start of a message, as the whole
    message, or (the apology, said after a cut answer) at its end. A message left empty is
    dropped (some providers refuse an empty assistant content), unless it has tool calls.
    So the model never learns to open its answers with "One moment, let me check."."""
    drop = []
    for i, message in enumerate(messages):
        if type(message) is not dict or message.get("role") != "assistant":
            continue
        content = message.get("content")
        if type(content) is not str or not content:
            continue
        text = content.strip()
        if not (text.startswith(phrases) or text.endswith(phrases)):
            continue  # (most messages: one C call for every phrase)
        changed = True
        while changed and text:
            changed = False
            for phrase in phrases:
                if text.startswith(phrase):
                    text, changed = text[len(phrase):].lstrip(), True
                elif text.endswith(phrase):
                    text, changed = text[: -len(phrase)].rstrip(), True
        if text == content.strip():
            continue
        if text or message.get("tool_calls"):
            message["content"] = text
        else:
            drop.append(i)
    for i in reversed(drop):
        del messages[i]


def cache_key(metadata: dict[str, Any]) -> str | None:
    """A stable hash of the call's channel (app id and channel name, never the names):
    one call's turns share the provider's prompt cache."""
    channel = channel_key(metadata)
    if channel is None:
        return None
    return "llmgate-" + hashlib.sha256(channel.encode()).hexdigest()[:32]


def channel_key(metadata: dict[str, Any]) -> str | None:
    """ "app/channel" from Agora's `context` object, else from `llm.params` fields."""
    context = metadata.get("context")
    context = context if isinstance(context, dict) else {}
    channel = context.get("channel") or metadata.get("channel")
    if not isinstance(channel, str) or not channel:
        return None
    app = context.get("appId") or metadata.get("app_id") or metadata.get("appId") or ""
    key = f"{app}/{channel}"
    if len(key) > MAX_CHANNEL_KEY:  # a caller's own names: bounded where they are kept
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        key = f"{key[: MAX_CHANNEL_KEY - 17]}#{digest}"
    return key
