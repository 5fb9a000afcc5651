"""The frame relay: the fast whole-frames path and the event path give the same bytes."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from llmgate.config import ProviderConfig
from llmgate.upstream.provider import Provider
from llmgate.upstream.relay import Relay, Tally

SECRET = "sk-upstream-Secret-1234"
PROVIDER = Provider(  # what the relay says of a failure is its provider's
    "p",
    ProviderConfig(
        base_url="http://127.0.0.1:9/v1", api_key=SECRET, headers={"api-key": "azure-Secret-99"}
    ),
)


class EventsOnly(Relay):
    """The reference: every read event by event."""

    def _whole_frames(self, data: bytes) -> bytes | None:
        return None


def chunk(content: str | None = None, finish: str | None = None, usage: bool = False) -> bytes:
    delta = {} if content is None else {"content": content}
    body = {
        "object": "chat.completion.chunk",
        "choices": [{"delta": delta, "finish_reason": finish}],
    }
    if usage:
        body = {"choices": [], "usage": {"total_tokens": 7}}
    return json.dumps(body).encode()


def frames(*payloads: bytes) -> bytes:
    return b"".join(b"data: " + p + b"\n\n" for p in payloads)


def run(relay_class: type[Relay], *reads: bytes) -> tuple[bytes, Relay, Tally]:
    relay = relay_class(PROVIDER)
    out = b""
    for read in reads:
        out += relay.feed(read)
        if relay.done or relay.failure:
            break
    return out, relay, relay.tally


def test_whole_frames_pass_through_and_are_peeked():
    body = frames(chunk("a"), chunk("b"), chunk(finish="stop"), chunk(usage=True))
    out, relay, turn = run(Relay, body + b"data: [DONE]\n\n")
    assert out == body
    assert Relay(PROVIDER)._whole_frames(body) == body  # the fast path
    assert relay.done and relay.failure is None
    assert (turn.chunks, turn.finish_reason, turn.usage) == (4, "stop", {"total_tokens": 7})


def test_error_frame_ends_the_stream_as_our_own_error_redacted():
    # the provider echoes its key (in another case), the Azure header's, and a Bearer token
    message = f"overloaded for {SECRET.upper()} / AZURE-SECRET-99 / bearer abcdefgh1234"
    error = json.dumps({"error": {"message": message, "type": "server_error"}}).encode()
    for relay_class in (Relay, EventsOnly):
        out, relay, _ = run(relay_class, frames(chunk("a"), error, chunk("never")))
        assert out == frames(chunk("a"))  # the provider's frame is not passed on as it came
        failure = relay.failure
        assert failure is not None and failure.status == 502 and failure.code == "upstream_error"
        assert "overloaded" in failure.message and "[redacted]" in failure.message
        assert "secret" not in failure.message.lower() and "abcdefgh" not in failure.message


def test_invalid_utf8_inside_a_string_is_refused_on_both_paths():
    bad = b'{"choices": [{"delta": {"content": "a\xff\xfe"}, "finish_reason": null}]}'
    for relay_class in (Relay, EventsOnly):
        out, relay, _ = run(relay_class, frames(chunk("a"), bad, chunk(finish="stop")))
        assert out == frames(chunk("a"))
        assert relay.failure is not None and "malformed" in relay.failure.message


def test_garbage_frame_stops_before_it():
    for garbage in (b"not json", b"[1, 2]", b'{"a": 1}, {"b": 2}', b""):
        out, relay, _ = run(Relay, frames(chunk("a"), garbage, chunk("b")))
        assert out == frames(chunk("a")), garbage
        assert relay.failure is not None and relay.failure.status == 502


def test_done_in_the_middle_ends_there():
    out, relay, _ = run(Relay, frames(chunk("a"), b"[DONE]", chunk("late")))
    assert out == frames(chunk("a"))
    assert relay.done


@st.composite
def streams(draw) -> tuple[list[bytes], bytes]:
    """(the reads, what the caller must get) for a stream of mixed frame shapes."""
    eol = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    words = draw(st.lists(st.text(max_size=8), max_size=8))
    raw, expected = b"", b""
    for word in words:
        payload = chunk(word)
        shape = draw(st.sampled_from(["plain", "two-lines", "comment", "event"]))
        if shape == "two-lines":
            head, tail = payload.split(b", ", 1)
            raw += b"data: " + head + b"," + eol + b"data: " + tail + eol + eol
            expected += b"data: " + head + b",\ndata: " + tail + b"\n\n"
            continue
        if shape == "comment":
            raw += b": ping" + eol + eol
        if shape == "event":
            raw += b"event: delta" + eol
        raw += b"data: " + payload + eol + eol
        expected += b"data: " + payload + b"\n\n"
    raw += b"data: " + chunk(finish="stop") + eol + eol + b"data: [DONE]" + eol + eol
    expected += b"data: " + chunk(finish="stop") + b"\n\n"
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=6)))
    reads = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    return [r for r in reads if r], expected


@settings(max_examples=300, deadline=None)
@given(streams())
def test_fast_path_and_event_path_give_the_same_bytes(stream):
    reads, expected = stream
    fast, fast_relay, fast_turn = run(Relay, *reads)
    slow, slow_relay, slow_turn = run(EventsOnly, *reads)
    assert fast == slow == expected
    assert fast_relay.done and slow_relay.done
    assert fast_turn.chunks == slow_turn.chunks
    assert fast_turn.finish_reason == slow_turn.finish_reason == "stop"


def test_a_running_usage_total_in_every_chunk_counts_once():
    def with_usage(total: int) -> bytes:
        return json.dumps({"choices": [], "usage": {"total_tokens": total}}).encode()

    _, _, tally = run(Relay, frames(with_usage(3), with_usage(5), chunk(finish="stop")))
    assert tally.usage == {"total_tokens": 5} and tally.chunks == 3
