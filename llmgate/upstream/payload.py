"""What goes upstream: the caller's own JSON, less the engine's fields, with the model set.

Built from a generic decode of the body, not from our Structs, so a parameter they do not
name still reaches the provider. Agora's extras (`llmgate.agora`) are taken out and
returned as the turn's metadata.
"""

from __future__ import annotations

from typing import Any

from llmgate.agora import take_engine_fields


def build(
    raw: dict[str, Any], model: str, forward: frozenset[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the upstream body (`raw`, changed in place) and the metadata taken out of it."""
    metadata = take_engine_fields(raw, forward)
    raw["model"] = model
    return raw, metadata
