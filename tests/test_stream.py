"""The SSE writer's own keep-alives: pings while the answer waits, none after its end."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import make_mocked_request

from llmgate.server.stream import SSEResponse


class SlowCaller:
    """A payload writer whose caller drains the end of the body slowly."""

    buffer_size = 0
    output_size = 0
    length = None

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def write_headers(self, status_line: str, headers) -> None:
        self.sent.append(b"<headers>")

    def send_headers(self) -> None:
        pass

    def enable_chunking(self) -> None:
        pass

    async def write(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    async def drain(self) -> None:
        pass

    async def write_eof(self, data: bytes = b"") -> None:
        self.sent += [bytes(data), b"<end>"]
        await asyncio.sleep(0.05)  # the chunked end waits on the caller


async def test_pings_while_waiting_and_none_after_the_end():
    caller = SlowCaller()
    sse = SSEResponse("req_x", keepalive_s=0.01)
    await sse.prepare(make_mocked_request("POST", "/", writer=caller))
    await asyncio.sleep(0.035)
    assert caller.sent.count(b": ping\n\n") >= 2
    await sse.write_eof(b"data: [DONE]\n\n")  # pings fall due while the caller drains
    await asyncio.sleep(0.05)
    assert caller.sent[-2:] == [b"data: [DONE]\n\n", b"<end>"]
    assert sse._timer is None
