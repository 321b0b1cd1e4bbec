"""A GGUF file's key/value metadata and where its tensors lie, read from its header without
loading them (the `gguf` package's reader maps every field as numpy arrays: ~20 s for a
262k-token vocab)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TensorInfo:
    """A tensor of a GGUF file: its GGML type id, its dimensions (the fastest first, as GGUF
    lists them) and where its data starts in the file."""

    ggml_type: int
    dims: tuple[int, ...]
    offset: int


def read_metadata(gguf_path: Path) -> dict[str, Any]:
    """A GGUF file's key/value metadata (its header; the tensors are not read)."""
    return _read_header(gguf_path, tensors=False)[0]


def read_tensor_infos(gguf_path: Path) -> dict[str, TensorInfo]:
    """A GGUF file's tensors by name, from its header (their data is not read)."""
    return _read_header(gguf_path, tensors=True)[1]


def _read_header(gguf_path: Path, tensors: bool) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    with open(gguf_path, "rb") as f:
        head = f.read(24)
        magic, version, n_tensors, count = struct.unpack("<4sIQQ", head)
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"{gguf_path}: not a GGUF v2+ file")
        reader = _Reader(f, start=24)
        meta: dict[str, Any] = {}
        for _ in range(count):
            key = reader.string()
            meta[key] = reader.value(reader.unpack("<I"))
        infos: dict[str, tuple[int, tuple[int, ...], int]] = {}
        for _ in range(n_tensors if tensors else 0):
            name = reader.string()
            dims = tuple(reader.unpack("<Q") for _ in range(reader.unpack("<I")))
            infos[name] = (reader.unpack("<I"), dims, reader.unpack("<Q"))
        align = int(meta.get("general.alignment", 32))
        data = -(-reader.tell() // align) * align  # tensor offsets count from here
    return meta, {n: TensorInfo(t, d, data + o) for n, (t, d, o) in infos.items()}


class _Reader:
    """Reads GGUF header values from a file, a block at a time."""

    def __init__(self, f: Any, start: int) -> None:
        self._f = f
        self._buf = b""
        self._at = 0
        self._start = start  # the file offset of _buf[0]

    def tell(self) -> int:
        """The file offset of the next value."""
        return self._start + self._at

    def _need(self, n: int) -> None:
        if self._at + n > len(self._buf):
            more = self._f.read(max(n, 1 << 20))
            self._start += self._at
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
