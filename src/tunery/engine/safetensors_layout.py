"""Where a safetensors file's tensors land in memory: its data section moved to a 64-byte line.

A safetensors file is 8 bytes of header length, the JSON header, then the tensors' bytes; mapped,
a tensor sits at the same offset from a 64-byte line as in the file. `save_pretrained` pads the
header to 8 bytes only, so Gemma 3 270M's converted weights all start 16 bytes past a line, and
a kernel that reads whole lines of a weight (the training head's tiles: `head_loss.c`) reads two
for each. The format lets the header end in spaces, so padding it moves every tensor whose
offset is a multiple of 64 (all of them, for Gemma's shapes) onto a line, with the same bytes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

DATA_ALIGNMENT = 64
_LENGTH_BYTES = 8


def data_start(file: Path) -> int:
    """The file offset of the tensors' bytes (just past the header)."""
    with open(file, "rb") as f:
        return _LENGTH_BYTES + int.from_bytes(f.read(_LENGTH_BYTES), "little")


def align_data(file: Path) -> bool:
    """Rewrite `file` with its header padded so the tensors' bytes start at a multiple of
    `DATA_ALIGNMENT`; False (untouched) where they already do. Written beside it and renamed
    over it, whole or not at all: a process that has the old file mapped keeps reading it."""
    with open(file, "rb") as src:
        length = int.from_bytes(src.read(_LENGTH_BYTES), "little")
        if (_LENGTH_BYTES + length) % DATA_ALIGNMENT == 0:
            return False
        header = src.read(length)
        if len(header) != length or not header.lstrip().startswith(b"{"):
            raise ValueError(f"{file} is not a safetensors file")
        padded = header + b" " * (-(_LENGTH_BYTES + length) % DATA_ALIGNMENT)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.align")
        try:
            with open(tmp, "wb") as dst:
                dst.write(len(padded).to_bytes(_LENGTH_BYTES, "little"))
                dst.write(padded)
                shutil.copyfileobj(src, dst, 16 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            shutil.copymode(file, tmp)
            os.replace(tmp, file)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return True
