"""Provider: the URL it calls, the headers it sends, and how its failures read."""

from __future__ import annotations

import pytest

from llmgate.config import ProviderConfig
from llmgate.upstream.provider import Provider


@pytest.mark.parametrize(
    ("base_url", "url"),
    [
        ("https://api.openai.com/v1", "https://api.openai.com/v1/chat/completions"),
        ("https://api.openai.com/v1/", "https://api.openai.com/v1/chat/completions"),
        (
            "https://r.openai.azure.com/openai/deployments/gpt4o?api-version=2024-10-21",
            "https://r.openai.azure.com/openai/deployments/gpt4o/chat/completions"
            "?api-version=2024-10-21",
        ),
        ("http://127.0.0.1:11434/v1", "http://127.0.0.1:11434/v1/chat/completions"),
    ],
)
def test_chat_completions_url(base_url, url):
    assert str(Provider("p", ProviderConfig(base_url=base_url)).url) == url


def test_redact_hides_our_key_and_key_like_strings():
    provider = Provider("p", ProviderConfig(base_url="http://x/v1", api_key="secret-123456"))
    text = provider.redact("bad key secret-123456, also sk-proj-abcdefgh and Bearer abc.def-ghi")
    assert "secret-123456" not in text and "sk-proj" not in text and "abc.def" not in text
