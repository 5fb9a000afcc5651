"""Kept only for `llmgate.kb.retriever`'s import: llmgate's own outbound HTTP is llmgate.http."""

from llmgate.http import OwnSession

__all__ = ["OwnSession"]
