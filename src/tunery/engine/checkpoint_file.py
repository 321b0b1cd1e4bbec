"""A training checkpoint's state in one file: its structure (dicts, lists, numbers) pickled in a
short header, its tensors' bytes after it, as they lie in memory.

`torch.save` of the same state (a LoRA adapter, its AdamW moments: ~28 MB for the default
recipe on Gemma 3 270M) pickles every tensor and checksums a zip archive on the writer thread,
which held the GIL and a core for 60 ms a checkpoint against the training steps beside it: the
seed run (4 checkpoints) took 2.70 s with them and 2.47 s without. Written this way the bytes go
to the file in one `write` per tensor (no copy, the GIL released), and the run takes ~2.5 s.

Layout: 8 bytes magic, 8 bytes header length (little-endian), the header (a pickle of
`(skeleton, tensors)`: the state with each tensor replaced by its index, and each tensor's dtype
name, shape and byte count), then the tensors' bytes in that order.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

MAGIC = b"TUNCKPT1"


class _Ref:
    """A tensor's place in the skeleton: its index in the tensor list."""

    def __init__(self, index: int) -> None:
        self.index = index


def write_state(f: BinaryIO, state: Any) -> None:
    """Write `state` (nested dicts, lists and tuples of tensors and plain values; the tensors on
    the CPU) to the open binary file `f`."""
    tensors: list[torch.Tensor] = []

    def strip(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        tensors.append(value.detach().contiguous())
        return _Ref(len(tensors) - 1)

    skeleton = _map_leaves(state, strip)
    table = [(str(t.dtype).removeprefix("torch."), tuple(t.shape), t.nbytes) for t in tensors]
    header = pickle.dumps((skeleton, table), protocol=pickle.HIGHEST_PROTOCOL)
    f.write(MAGIC + struct.pack("<Q", len(header)) + header)
    for t in tensors:
        if t.nbytes:
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def read_state(path: Path) -> Any:
    """The state `write_state` wrote to `path`; ValueError for a file it did not write whole."""
    data = bytearray(path.read_bytes())
    if data[:8] != MAGIC or len(data) < 16:
        raise ValueError(f"{path.name} is not a checkpoint")
    (length,) = struct.unpack("<Q", data[8:16])
    skeleton, table = pickle.loads(data[16 : 16 + length])
    offset = 16 + length
    tensors = []
    for dtype, shape, nbytes in table:
        if offset + nbytes > len(data):
            raise ValueError(f"{path.name} is cut short")
        raw = torch.empty(0, dtype=torch.uint8)
        if nbytes:  # a copy of its own: aligned for its dtype, not holding the whole file
            raw = torch.frombuffer(data, dtype=torch.uint8, count=nbytes, offset=offset).clone()
        tensors.append(raw.view(getattr(torch, dtype)).reshape(shape))
        offset += nbytes

    return _map_leaves(skeleton, lambda v: tensors[v.index] if isinstance(v, _Ref) else v)


def _map_leaves(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """`value` with each leaf (anything but a dict, list or tuple) replaced by `leaf(it)`."""
    if isinstance(value, dict):
        return {k: _map_leaves(v, leaf) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_leaves(v, leaf) for v in value)
    return leaf(value)
