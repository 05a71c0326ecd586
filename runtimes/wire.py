"""Messages between the core process and an engine's worker process, in the standard library and numpy alone (the
two sides run different numpy versions, so arrays cross as dtype, shape and bytes, never as pickled numpy objects).

A message is one pickled (kind, payload) pair of plain Python values. The core sends (command, arguments) and the
worker answers ("ok", value) or ("error", message).
"""

from __future__ import annotations

import pickle
from typing import Any, BinaryIO

import numpy as np

Encoded = tuple[str, tuple[int, ...], bytes]
PROTOCOL = 4  # Python 3.8 reads it: the oldest interpreter an engine's environment may have


def encode(array: np.ndarray) -> Encoded:
    array = np.ascontiguousarray(array)
    return array.dtype.str, tuple(array.shape), array.tobytes()


def decode(encoded: Encoded) -> np.ndarray:
    dtype, shape, data = encoded
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy()


def encode_feed(feed: dict[str, np.ndarray]) -> dict[str, Encoded]:
    return {name: encode(value) for name, value in feed.items()}


def decode_feed(feed: dict[str, Encoded]) -> dict[str, np.ndarray]:
    return {name: decode(value) for name, value in feed.items()}


def send(channel: BinaryIO, kind: str, payload: Any) -> None:
    pickle.dump((kind, payload), channel, protocol=PROTOCOL)
    channel.flush()


def receive(channel: BinaryIO) -> tuple[str, Any]:
    """The next message; EOFError when the other side has gone."""
    kind, payload = pickle.load(channel)
    return kind, payload
