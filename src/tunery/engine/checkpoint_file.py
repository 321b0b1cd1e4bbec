"""A training checkpoint's state in one file: its structure (dicts, lists, numbers) pickled in a
short header, its tensors' bytes after it.

The file is built in memory first (`StateImage`: one page-aligned buffer, filled on the training
thread, which is the snapshot: the optimizer may then go on updating its tensors) and written
later on another thread, straight from that buffer with O_DIRECT where the file system takes it.
A buffered write of the same ~28 MB (a LoRA adapter and its AdamW moments, the default recipe on
Gemma 3 270M) spent 7-80 ms of CPU copying it into the page cache, plus the kernel's writeback,
against the training steps beside it on a 2-core CPU: the seed run (4 checkpoints) took 2.99 s
with them and 2.70 s without. A direct write takes ~1 ms of CPU and the disk's time.

Layout: 8 bytes magic, 8 bytes header length (little-endian), the header (a pickle of
`(skeleton, table)`: the state with each tensor replaced by its index, and each tensor's dtype
name, shape, byte count and offset from the data's start), zeros up to the next 4 KB, the data.
The file's length is exactly the data's end, so a file cut short is refused.
"""

from __future__ import annotations

import errno
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MAGIC = b"TUNCKPT2"
_V1_MAGIC = b"TUNCKPT1"  # the previous layout: the data right after the header, back to back
_PAGE = 4096  # O_DIRECT's alignment of the buffer, the file offset and the length (≥ 512)
_ALIGN = 64  # each tensor's offset in the data


class _Ref:
    """A tensor's place in the skeleton: its index in the tensor list."""

    def __init__(self, index: int) -> None:
        self.index = index


class StateImage:
    """The checkpoint file of `state` (nested dicts, lists and tuples of CPU tensors and plain
    values), its tensors copied now; `reuse`: an earlier image whose buffer it may write over
    (that image is spent)."""

    def __init__(self, state: Any, reuse: StateImage | None = None) -> None:
        tensors: list[torch.Tensor] = []

        def strip(value: Any) -> Any:
            if not isinstance(value, torch.Tensor):
                return value
            tensors.append(value.detach())
            return _Ref(len(tensors) - 1)

        skeleton = _map_leaves(state, strip)
        table, end = [], 0
        for t in tensors:
            table.append((str(t.dtype).removeprefix("torch."), tuple(t.shape), t.nbytes, end))
            end += -(-t.nbytes // _ALIGN) * _ALIGN
        header = pickle.dumps((skeleton, table), protocol=pickle.HIGHEST_PROTOCOL)
        start = _pages(16 + len(header))
        self.size = start + (table[-1][3] + table[-1][2] if table else 0)  # the file's length
        spare = reuse._buffer if reuse is not None else None
        self._buffer: torch.Tensor = _aligned(_pages(self.size), spare)
        head = MAGIC + struct.pack("<Q", len(header)) + header
        self._buffer[: len(head)].copy_(torch.frombuffer(bytearray(head), dtype=torch.uint8))
        self._buffer[len(head) : start].zero_()
        for t, (_, _, nbytes, offset) in zip(tensors, table, strict=True):
            if nbytes:
                at = start + offset
                self._buffer[at : at + nbytes].view(t.dtype).view(t.shape).copy_(t)

    def write(self, path: Path) -> None:
        """Write the file at `path` (created or replaced) and fsync it."""
        try:
            self._write(path, os.O_DIRECT)
        except OSError as e:  # a file system without direct I/O: through the page cache
            if e.errno != errno.EINVAL:
                raise
            self._write(path, 0)

    def _write(self, path: Path, flags: int) -> None:
        data = memoryview(self._buffer.numpy().data)  # whole pages: O_DIRECT's unit
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
        try:
            while data:
                data = data[os.write(fd, data) :]
            os.ftruncate(fd, self.size)  # the padding after the data goes
            os.fsync(fd)
        finally:
            os.close(fd)


def read_state(path: Path) -> Any:
    """The state a `StateImage` wrote to `path`; ValueError for a file it did not write whole."""
    data = bytearray(path.read_bytes())
    if data[:8] not in (MAGIC, _V1_MAGIC) or len(data) < 16:
        raise ValueError(f"{path.name} is not a checkpoint")
    (length,) = struct.unpack("<Q", data[8:16])
    skeleton, table = pickle.loads(data[16 : 16 + length])
    if data[:8] == _V1_MAGIC:  # (dtype, shape, nbytes): back to back after the header
        start, offsets = 16 + length, [0]
        for _, _, nbytes in table:
            offsets.append(offsets[-1] + nbytes)
        table = [(*entry, offset) for entry, offset in zip(table, offsets, strict=False)]
    else:
        start = _pages(16 + length)
    tensors = []
    for dtype, shape, nbytes, offset in table:
        at = start + offset
        if at + nbytes > len(data):
            raise ValueError(f"{path.name} is cut short")
        raw = torch.empty(0, dtype=torch.uint8)
        if nbytes:  # a copy of its own: aligned for its dtype, not holding the whole file
            raw = torch.frombuffer(data, dtype=torch.uint8, count=nbytes, offset=at).clone()
        tensors.append(raw.view(getattr(torch, dtype)).reshape(shape))
    return _map_leaves(skeleton, lambda v: tensors[v.index] if isinstance(v, _Ref) else v)


def _pages(n: int) -> int:
    return -(-n // _PAGE) * _PAGE


def _aligned(size: int, spare: torch.Tensor | None) -> torch.Tensor:
    """`size` bytes at a page-aligned address: `spare`'s memory when it is large enough."""
    if spare is not None and spare.numel() >= size:
        return spare[:size]
    raw = torch.empty(size + _PAGE, dtype=torch.uint8)
    skip = -raw.data_ptr() % _PAGE
    return raw[skip : skip + size]


def _map_leaves(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """`value` with each leaf (anything but a dict, list or tuple) replaced by `leaf(it)`."""
    if isinstance(value, dict):
        return {k: _map_leaves(v, leaf) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_leaves(v, leaf) for v in value)
    return leaf(value)
