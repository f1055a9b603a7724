"""Length-prefixed frames between the guard and the app's process (no Flower, no guard code)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import IO

#: The largest answer read from the app's process (a model of ~128 M float32s).
MAX_RESULT_BYTES = 512 * 1024 * 1024

_LEN = struct.Struct(">Q")


def write_frames(stream: IO[bytes], frames: Sequence[bytes]) -> None:
    """Write ``frames`` as (8-byte big-endian length, bytes) pairs."""
    for frame in frames:
        stream.write(_LEN.pack(len(frame)))
        stream.write(frame)
    stream.flush()


def read_frames(stream: IO[bytes], count: int, limit: int = MAX_RESULT_BYTES) -> list[bytes]:
    """Read ``count`` frames written by :func:`write_frames`.

    Raises:
        EOFError: the stream ended early.
        ValueError: the frames add up to more than ``limit`` bytes.
    """
    frames, total = [], 0
    for _ in range(count):
        head = stream.read(_LEN.size)
        if len(head) != _LEN.size:
            raise EOFError("the stream ended before its frames")
        (size,) = _LEN.unpack(head)
        total += size
        if total > limit:
            raise ValueError(f"the answer exceeds {limit} bytes")
        data = stream.read(size)
        if len(data) != size:
            raise EOFError("the stream ended inside a frame")
        frames.append(data)
    return frames
