"""scripts/bench_mock.py, answering with what a speech route has to clean: markdown, emoji,
links. Same protocol and model names ("mock-<chunks>-<first_ms>-<gap_ms>"), same /stats.

    python scripts/soak_mock.py [--port N]     # prints "mock listening on 127.0.0.1:N"
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mock

# A reply as a model streams one: markdown split across deltas, an emoji, a link, a list.
WORDS = (
    "**Sure**",
    ",",
    " here",
    " is",
    " what",
    " I",
    " *found*",
    ":",
    "\n\n",
    "1.",
    " The",
    " `opening`",
    " hours",
    " are",
    " on",
    " [the page](https://example.com/hours?id=42)",
    " \U0001f600",
    "\n",
    "-",
    " call",
    " **us**",
    " at",
    " https://example.com/contact",
    ".",
    "\n\n",
    "#",
    "# Notes",
    "\n",
    "> quoted",
    " text",
    " ~~old~~",
    " new",
    ".",
)


@lru_cache(maxsize=64)
def frames(chunks: int) -> tuple[bytes, ...]:
    def chunk(delta: dict, finish: str | None = None, **extra: object) -> bytes:
        body = {
            "id": "chatcmpl-soak",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "mock",
            "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            **extra,
        }
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": WORDS[i % len(WORDS)]}) for i in range(max(chunks - 2, 0))]
    usage = {"prompt_tokens": 100, "completion_tokens": chunks, "total_tokens": 100 + chunks}
    out.append(chunk({}, "stop", usage=usage))
    out.append(b"data: [DONE]\n\n")
    return (*(bench_mock._chunked(f) for f in out), b"0\r\n\r\n")


bench_mock.frames = frames  # MockProtocol.stream looks it up at call time

if __name__ == "__main__":
    bench_mock.main()
