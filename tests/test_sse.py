"""The SSE decoder: line ends, splits, comments, fields, multi-line data."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llmgate.sse import SSEDecoder, SSEError


def decode(*reads: bytes) -> list[tuple[bytes, bytes]]:
    decoder = SSEDecoder()
    return [(e.event, e.data) for r in reads for e in decoder.feed(r)]


def test_lf_crlf_and_cr_line_ends_decode_alike():
    for eol in (b"\n", b"\r\n", b"\r"):
        stream = b"data: one" + eol + eol + b"data: two" + eol + eol
        assert decode(stream) == [(b"", b"one"), (b"", b"two")], eol


def test_crlf_split_between_reads_is_one_line_end():
    assert decode(b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n") == [(b"", b"a"), (b"", b"b")]


def test_cr_at_end_of_read_dispatches_without_waiting():
    decoder = SSEDecoder()
    assert [e.data for e in decoder.feed(b"data: now\r\r")] == [b"now"]


def test_comments_event_id_retry_and_no_space_after_colon():
    stream = b': keep-alive\n\nevent: delta\nid: 7\nretry: 100\ndata:{"a":1}\n\n'
    assert decode(stream) == [(b"delta", b'{"a":1}')]


def test_multi_line_data_is_joined_and_reframed_line_by_line():
    [event] = SSEDecoder().feed(b'data: {"a":\ndata: 1}\n\n')
    assert event.data == b'{"a":\n1}'
    assert event.frame() == b'data: {"a":\ndata: 1}\n\n'


def test_single_line_frame_is_byte_for_byte():
    payload = b'{"choices":[{"delta":{"content":"h\xc3\xa9"}}]}'
    [event] = SSEDecoder().feed(b"data: " + payload + b"\n\n")
    assert event.frame() == b"data: " + payload + b"\n\n"


def test_utf8_split_inside_a_character_survives():
    text = "h\u00e9llo \U0001f44b".encode()
    stream = b"data: " + text + b"\n\n"
    cut = stream.index(b"\xf0") + 2  # inside the 4-byte emoji
    assert decode(stream[:cut], stream[cut:]) == [(b"", text)]


def test_unterminated_last_event_is_not_dispatched():
    assert decode(b"data: done\n\ndata: partial\n") == [(b"", b"done")]


def test_blank_lines_without_data_dispatch_nothing():
    assert decode(b"\n\n\nevent: x\n\n") == []


def test_oversized_line_is_an_error():
    decoder = SSEDecoder()
    try:
        decoder.feed(b"data: " + b"x" * (9 * 1024 * 1024))
    except SSEError:
        return
    raise AssertionError("expected SSEError")


frames = st.lists(
    st.tuples(
        st.sampled_from([b"\n", b"\r\n", b"\r"]),
        st.binary(min_size=0, max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        st.booleans(),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(frames=frames, cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=20))
def test_any_split_of_a_stream_decodes_to_the_same_events(frames, cuts):
    stream = b""
    for eol, data, with_comment in frames:
        if with_comment:
            stream += b": ping" + eol
        stream += b"data: " + data + eol + eol
    whole = decode(stream)
    assert [d for _, d in whole] == [data for _, data, _ in frames]
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert decode(*pieces) == whole


def test_a_long_line_over_many_reads_is_joined_once():
    decoder = SSEDecoder()
    pieces = [b"data: " + b"x" * 10] + [b"y" * 10 for _ in range(1000)]
    for piece in pieces:
        assert decoder.feed(piece) == []
    # Each read is kept as it came (no copy of all that came before it) ...
    assert all(a is b for a, b in zip(decoder._open, pieces, strict=True))
    [event] = decoder.feed(b"z\n\n")
    # ... and the line is put together once its end arrives.
    assert event.data == b"x" * 10 + b"y" * 10_000 + b"z"
    assert decoder.idle
