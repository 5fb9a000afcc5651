"""What goes upstream: the caller's own JSON, less the engine's fields, with the model set.

Built from a generic decode of the body, not from our Structs, so a parameter they do not
name still reaches the provider. Agora's extras (`context`, merged `llm.params`, per-message
`turn_id`/`timestamp`/`metadata`) are taken out and returned as the turn's metadata.
"""

from __future__ import annotations

from typing import Any

from llmgate.protocol import ENGINE_MESSAGE_FIELDS


def build(
    raw: dict[str, Any], model: str, forward: frozenset[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the upstream body (`raw`, changed in place) and the metadata taken out of it."""
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
    raw["model"] = model
    return raw, metadata
