"""A base model's packed decode weights, kept on disk between starts.

`FastGemma3` reads a model's projections as bf16 panels (`linear.c`) or, on AMX tiles, as its
GGUF's blocks (`tiles.c`: unpacking and checking them takes ~0.7 s for Gemma 3 270M), and
greedy picks scan an int8 copy of its head (`head.c`). Packing them takes 0.8 s on 2 cores
alone, 1.2-1.4 s in a starting server, where it was most of the time from `/healthz` to
`/readyz`. The packs depend only on the weights and on the kernels' build, so the first process
to build them writes them to one file named by both (~290-370 MB for Gemma 3 270M, beside its
540 MB of weights), and every later process reads them back instead. A file that is missing,
torn or from another build is ignored (and rewritten); loading never fails because of it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tunery.engine.native import NativeKernels, PackedBlocks, PackedHead, PackedLinear

log = logging.getLogger(__name__)

_FORMAT = "3"
_HEAD_FIELDS = ("int8", "scale", "norm", "err_norm", "offset")


@dataclass(frozen=True)
class KernelCache:
    """Where one model's packs are kept: `directory`, in a file named by `stamp` (the weights'
    files, as the registry sees them) and the kernels' build."""

    directory: Path
    stamp: str

    def file(self, kernels: NativeKernels) -> Path:
        return self.directory / f"packs-{self.stamp}-{kernels.build}.safetensors"


@dataclass
class Packs:
    """A model's packed weights: each projection's panels by name (None where its weights are
    not bf16 values), the head's pack (None without one), and each projection's GGUF blocks
    packed for the tiles (None where they are not its weights)."""

    linears: dict[str, PackedLinear | None]
    head: PackedHead | None
    blocks: dict[str, PackedBlocks | None] = field(default_factory=dict)


def read(
    cache: KernelCache, kernels: NativeKernels, head_weight: torch.Tensor | None
) -> Packs | None:
    """The packs saved for this model and build, or None. `head_weight` (the weight the head
    pack is of) None: the head pack is not read."""
    path = cache.file(kernels)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                return None
            shapes = json.loads(meta["linears"])
            linears: dict[str, PackedLinear | None] = {}
            for name, shape in shapes.items():
                if shape is None:
                    linears[name] = None
                    continue
                n_out, n_in = shape
                panels = f.get_tensor(f"linear.{name}")
                want = -(-n_out // kernels.linear_panel) * kernels.linear_panel * n_in
                if panels.dtype != torch.bfloat16 or panels.numel() != want:
                    return None
                linears[name] = PackedLinear(panels, n_out, n_in)
            blocks: dict[str, PackedBlocks | None] = {}
            for name, layout in json.loads(meta.get("blocks", "{}")).items():
                if layout is None:
                    blocks[name] = None
                    continue
                n_out, n_in, sets, offsets = layout
                records = f.get_tensor(f"blocks.{name}")
                want = n_out // 16 * (n_in // 32) * kernels.blocks_record(sets, offsets)
                if records.dtype != torch.uint8 or records.numel() != want:
                    return None
                blocks[name] = PackedBlocks(records, n_out, n_in, sets, offsets)
            head = None
            if head_weight is not None and meta.get("head") == "1":
                head = PackedHead.of(
                    head_weight, *(f.get_tensor(f"head.{k}") for k in _HEAD_FIELDS)
                )
            return Packs(linears, head, blocks)
    except FileNotFoundError:
        return None
    except Exception:  # torn, foreign or of other shapes: rebuilt and rewritten
        log.warning("packed weights %s unreadable; packing again", path, exc_info=True)
        return None


def write_in_background(cache: KernelCache, kernels: NativeKernels, packs: Packs) -> None:
    """Save `packs` (in a daemon thread: nobody waits for it), whole or not at all; then remove
    this model's files of other builds."""
    threading.Thread(
        target=_write, args=(cache, kernels, packs), name="tunery-save-packs", daemon=True
    ).start()


def _write(cache: KernelCache, kernels: NativeKernels, packs: Packs) -> None:
    path = cache.file(kernels)
    tensors = {f"linear.{n}": p.panels for n, p in packs.linears.items() if p is not None}
    shapes = {n: None if p is None else [p.n_out, p.n_in] for n, p in packs.linears.items()}
    if packs.head is not None:
        tensors |= {f"head.{k}": getattr(packs.head, k) for k in _HEAD_FIELDS}
    tensors |= {f"blocks.{n}": p.records for n, p in packs.blocks.items() if p is not None}
    layouts = {
        n: None if p is None else [p.n_out, p.n_in, p.sets, p.offsets]
        for n, p in packs.blocks.items()
    }
    meta = {
        "format": _FORMAT,
        "linears": json.dumps(shapes),
        "blocks": json.dumps(layouts),
        "head": "1" if packs.head is not None else "0",
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        cache.directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        for stale in cache.directory.glob("packs-*.safetensors"):  # the directory is the model's
            if stale != path:
                stale.unlink(missing_ok=True)
    except OSError:  # a read-only or full data dir only loses the speed-up
        log.warning("could not save packed weights to %s", path, exc_info=True)
        tmp.unlink(missing_ok=True)
