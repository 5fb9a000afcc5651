"""PCM16 little-endian mono: exact frames for the wire, streaming resampling, WAV headers."""

from __future__ import annotations

import struct

import numpy as np
import soxr


def frame_size(sample_rate: int, chunk_ms: int) -> int:
    """Bytes in one frame: 16 kHz and 40 ms make 1280."""
    return sample_rate * chunk_ms // 1000 * 2  # whole samples, whatever the rate


class Framer:
    """PCM in, frames of exactly `size` bytes out; `flush()` gives the shorter last one."""

    __slots__ = ("_pending", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._pending = b""

    def push(self, pcm: bytes) -> list[bytes]:
        data = self._pending + pcm
        whole = len(data) - len(data) % self.size
        self._pending = data[whole:]
        return [data[i : i + self.size] for i in range(0, whole, self.size)]

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest


HEADROOM = 0.9  # of full scale, kept before resampling: its filter overshoots peaks


class Resampler:
    """One utterance's PCM to the route's rate, chunk by chunk (soxr keeps its filter
    state); `push(..., last=True)` ends it, so make one per sentence.

    A voice normalised to full scale (piper's is) overshoots it when resampled, by up to a
    tenth at a sharp edge: in int16 those samples clipped to -32768. The samples are
    resampled as floats at HEADROOM of their level and clipped to int16's range, so a peak
    is never wrapped nor flattened."""

    def __init__(self, from_rate: int, to_rate: int) -> None:
        self.same = from_rate == to_rate
        self._stream = None if self.same else soxr.ResampleStream(
            from_rate, to_rate, 1, dtype="float32", quality="HQ"
        )
        self._odd = b""  # half a sample left from the last chunk

    def push(self, pcm: bytes, last: bool = False) -> bytes:
        if self.same:
            return pcm
        data = self._odd + pcm
        cut = len(data) - len(data) % 2
        self._odd = data[cut:]
        samples = np.frombuffer(data[:cut], dtype="<i2").astype(np.float32) * HEADROOM
        assert self._stream is not None
        out = self._stream.resample_chunk(samples, last=last)
        return np.clip(np.rint(out), -32768, 32767).astype("<i2").tobytes()


def wav_data_offset(head: bytes) -> tuple[int, int] | None:
    """(sample rate, where the samples start) of a PCM16 mono WAV header, None until the
    `data` chunk's header has arrived; ValueError for anything else."""
    if len(head) < 12:
        return None
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise ValueError("not a WAV stream")
    at, rate = 12, None
    while at + 8 <= len(head):
        kind, size = head[at : at + 4], struct.unpack_from("<I", head, at + 4)[0]
        if kind == b"fmt ":
            if at + 24 > len(head):
                return None
            if size < 16:
                raise ValueError("a WAV format chunk too short")
            fmt, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", head, at + 8)
            if fmt != 1 or channels != 1 or bits != 16 or not 8000 <= rate <= 192000:
                raise ValueError("not PCM16 mono at a usable rate")
        elif kind == b"data":
            if rate is None:
                raise ValueError("WAV data before its format")
            return rate, at + 8
        at += 8 + size + (size & 1)
    return None
