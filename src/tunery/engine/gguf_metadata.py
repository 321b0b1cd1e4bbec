"""A GGUF file's key/value metadata, read from its header without loading its tensors (the
`gguf` package's reader maps every field as numpy arrays: ~20 s for a 262k-token vocab)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

# GGUF metadata value types: struct formats of the scalars; 8 is a string, 9 an array.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


def read_metadata(gguf_path: Path) -> dict[str, Any]:
    """A GGUF file's key/value metadata (its header; the tensors are not read)."""
    with open(gguf_path, "rb") as f:
        head = f.read(24)
        magic, version, _tensors, count = struct.unpack("<4sIQQ", head)
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"{gguf_path}: not a GGUF v2+ file")
        reader = _Reader(f)
        meta: dict[str, Any] = {}
        for _ in range(count):
            key = reader.string()
            meta[key] = reader.value(reader.unpack("<I"))
    return meta


class _Reader:
    """Reads GGUF header values from a file, a block at a time."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self._buf = b""
        self._at = 0

    def _need(self, n: int) -> None:
        if self._at + n > len(self._buf):
            more = self._f.read(max(n, 1 << 20))
            self._buf = self._buf[self._at :] + more
            self._at = 0
            if n > len(self._buf):
                raise ValueError("GGUF header ends early")

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size)
        (value,) = struct.unpack_from(fmt, self._buf, self._at)
        self._at += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        self._need(n)
        text = self._buf[self._at : self._at + n].decode("utf-8", errors="replace")
        self._at += n
        return text

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack("<" + _SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise ValueError(f"GGUF value type {kind} is unknown")
        item, n = self.unpack("<I"), self.unpack("<Q")
        if item in _SCALARS:
            fmt = f"<{n}{_SCALARS[item]}"
            self._need(struct.calcsize(fmt))
            values = struct.unpack_from(fmt, self._buf, self._at)
            self._at += struct.calcsize(fmt)
            return list(values)
        return [self.value(item) for _ in range(n)]
