"""A fast mock OpenAI upstream for scripts/bench: pre-encoded SSE on a bare asyncio protocol.

The request's model says what to send: "mock-<chunks>-<first_ms>-<gap_ms>[-<tag>]". The tag
names the request in the abort log, so the harness can match a client's hang-up with the
moment the upstream saw its connection close. GET /stats returns counters and that log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from functools import lru_cache

_MODEL = re.compile(rb'"model"\s*:\s*"mock-(\d+)-(\d+)-(\d+)(?:-([A-Za-z0-9_]+))?"')
STATS = {"connections": 0, "started": 0, "completed": 0, "aborted": 0}
ABORTS: dict[str, float] = {}


@lru_cache(maxsize=64)
def frames(chunks: int) -> tuple[bytes, ...]:
    def chunk(delta: dict, finish: str | None = None) -> bytes:
        body = {
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "mock",
            "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": f" word{i}"}) for i in range(max(chunks - 2, 0))]
    out.append(chunk({}, "stop"))
    out.append(b"data: [DONE]\n\n")
    return (*(_chunked(f) for f in out), b"0\r\n\r\n")


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


class MockProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task | None = None
        self.tag: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        STATS["connections"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            STATS["aborted"] += 1
            if self.tag:
                ABORTS[self.tag] = time.monotonic()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            end = head_end + 4 + length
            if len(self.buf) < end:
                return
            body, self.buf = self.buf[head_end + 4 : end], self.buf[end:]
            if head.startswith(b"GET /stats"):
                self.reply_json({**STATS, "aborts": ABORTS})
            else:
                self.task = asyncio.get_running_loop().create_task(self.stream(body))

    def reply_json(self, obj: dict) -> None:
        body = json.dumps(obj).encode()
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )

    async def stream(self, body: bytes) -> None:
        match = _MODEL.search(body)
        chunks, first_ms, gap_ms = (int(g) for g in match.groups()[:3]) if match else (20, 0, 0)
        self.tag = match.group(4).decode() if match and match.group(4) else None
        STATS["started"] += 1
        transport = self.transport
        assert transport is not None
        transport.write(HEAD)
        if first_ms:
            await asyncio.sleep(first_ms / 1000)
        parts = frames(chunks)
        if not gap_ms:
            transport.write(b"".join(parts))
        else:
            for part in parts[:-2]:
                transport.write(part)
                await asyncio.sleep(gap_ms / 1000)
            transport.write(parts[-2] + parts[-1])
        STATS["completed"] += 1


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(MockProtocol, host, port, backlog=4096)
    print(f"mock listening on {host}:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
