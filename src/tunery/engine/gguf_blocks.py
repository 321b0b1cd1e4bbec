"""A GGUF weight's block-quantized codes, for decode steps that read them instead of bf16.

A model converted from a GGUF (the embedded Gemma 3 270M is Q4_K_M) has bf16 weights that are
each `scale * code - offset` of the file's blocks, worked out in fp32 and rounded: 2 bytes a
weight, where the codes and their scales take ~1.1-1.25 (`native/tiles.c` reads them, 8-bit
codes). Here each supported block format is unpacked into codes (out, in) int8, one fp32 scale
per block of 16 or 32 inputs, and for Q4_K an fp32 offset per block of 32, with the fp32
products gguf-py's dequantization (which transformers loads GGUFs with) forms, so that
`dequantized(blocks)` rounded to bf16 is the model's tensor, bit for bit; `matching` keeps a
weight's blocks only where it is.

Formats (ggml's block layouts): Q8_0 (fp16 d, 32 int8: d q), Q5_0 (fp16 d, 32 high bits, 16
bytes of low nibbles: d (q - 16)), Q4_K (256 values: fp16 d and dmin, 12 bytes of 6-bit scales
and mins, 128 bytes of nibbles: d sc q - dmin m per 32) and Q6_K (256 values: 128 bytes of low
nibbles, 64 of high bit pairs, 16 int8 scales, fp16 d: d sc (q - 32) per 16). Others: None.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tunery.engine.gguf_lora import GGUF_NAMES
from tunery.engine.gguf_metadata import TensorInfo, read_tensor_infos

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Blocks:
    """A weight (out, in) as codes (out, in) int8 with scale (out, in / block) fp32 and, where
    the format has one, offset (out, in / block) fp32: weight = scale * code - offset."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    block: int

    def dequantized(self) -> torch.Tensor:
        """The fp32 values: each scale times its code, less its offset, rounded once each."""
        w = self.codes.float() * self.scale.repeat_interleave(self.block, dim=1)
        if self.offset is not None:
            w -= self.offset.repeat_interleave(self.block, dim=1)
        return w

    def matches(self, weight: torch.Tensor) -> bool:
        """Whether these blocks, made back into `weight`'s dtype, are `weight` exactly."""
        if tuple(self.codes.shape) != tuple(weight.shape):
            return False
        return bool(torch.equal(self.dequantized().to(weight.dtype), weight))

    def widened(self, block: int, offset: bool) -> Blocks:
        """The same values with a scale per `block` (a divisor of this block) and, `offset`, an
        offset (zeros where the format has none: x - 0 is x): to stack with other formats."""
        repeat = self.block // block
        scale = self.scale.repeat_interleave(repeat, dim=1)
        off = self.offset.repeat_interleave(repeat, dim=1) if self.offset is not None else None
        if offset and off is None:
            off = torch.zeros_like(scale)
        return Blocks(self.codes, scale, off, block)


def stacked(parts: list[Blocks]) -> Blocks:
    """Several weights' blocks stacked by rows (a fused projection), in the finest block and
    with offsets where any part has them."""
    block = min(p.block for p in parts)
    offset = any(p.offset is not None for p in parts)
    wide = [p.widened(block, offset) for p in parts]
    offsets = [p.offset for p in wide if p.offset is not None]
    return Blocks(
        torch.cat([p.codes for p in wide]),
        torch.cat([p.scale for p in wide]),
        torch.cat(offsets) if offset else None,
        block,
    )


def _fp16(raw: np.ndarray) -> np.ndarray:
    """Little-endian fp16 bytes (..., 2) → fp32 (...)."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _q8_0(raw: np.ndarray, out: int, n_in: int) -> Blocks:
    b = raw.reshape(out, n_in // 32, 34)
    codes = np.ascontiguousarray(b[:, :, 2:]).view(np.int8).reshape(out, n_in)
    return Blocks(torch.from_numpy(codes.copy()), torch.from_numpy(_fp16(b[:, :, :2])), None, 32)


def _q5_0(raw: np.ndarray, out: int, n_in: int) -> Blocks:
    b = raw.reshape(out, n_in // 32, 22)
    d = _fp16(b[:, :, :2])
    bits = np.ascontiguousarray(b[:, :, 2:6]).view(np.uint32)  # (out, blocks, 1)
    high = ((bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # value j's 5th bit
    low = b[:, :, 6:22]
    low = np.concatenate([low & 0x0F, low >> 4], axis=-1)  # values 0-15, then 16-31
    codes = (low | (high << 4)).astype(np.int8) - np.int8(16)
    return Blocks(torch.from_numpy(codes.reshape(out, n_in)), torch.from_numpy(d), None, 32)


def _q4_k(raw: np.ndarray, out: int, n_in: int) -> Blocks:
    b = raw.reshape(out * (n_in // 256), 144)
    d, dmin = _fp16(b[:, 0:2]), _fp16(b[:, 2:4])
    s = b[:, 4:16].reshape(-1, 3, 4)
    lo, hi, mixed = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([lo & 0x3F, (mixed & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([hi & 0x3F, (mixed >> 4) | ((hi >> 2) & 0x30)], axis=-1)
    scale = d[:, None] * sc.astype(np.float32)  # (blocks, 8): one per 32 values
    offset = dmin[:, None] * mn.astype(np.float32)
    q = b[:, 16:144].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    codes = (q & 0x0F).astype(np.int8).reshape(out, n_in)  # per 64: low nibbles, then high
    per_row = n_in // 32
    return Blocks(
        torch.from_numpy(codes),
        torch.from_numpy(scale.reshape(out, per_row)),
        torch.from_numpy(offset.reshape(out, per_row)),
        32,
    )


def _q6_k(raw: np.ndarray, out: int, n_in: int) -> Blocks:
    b = raw.reshape(out * (n_in // 256), 210)
    nibbles = b[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(
        1, 1, 2, 1
    )
    low = (nibbles & 0x0F).reshape(-1, 8, 32)
    pairs = b[:, 128:192].reshape(-1, 2, 1, 32)
    high = (pairs >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
    codes = (low | (high.reshape(-1, 8, 32) << 4)).astype(np.int8) - np.int8(32)
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    scale = _fp16(b[:, 208:210])[:, None] * sc  # (blocks, 16): one per 16 values
    return Blocks(
        torch.from_numpy(codes.reshape(out, n_in)),
        torch.from_numpy(scale.reshape(out, n_in // 16)),
        None,
        16,
    )


# state-dict names of the embedding and an untied head → the GGUF's
_OWN_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight"}


def gguf_name(name: str) -> str | None:
    """The GGUF tensor name of the state-dict weight `name` ("model.layers.3.self_attn.q_proj
    .weight" → "blk.3.attn_q.weight"), or None for one that is not a projection or the head."""
    parts = name.split(".")
    if len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[5] == "weight":
        proj = GGUF_NAMES.get(parts[4])
        return f"blk.{parts[2]}.{proj}.weight" if proj else None
    return _OWN_NAMES.get(name)


# GGML type id → (values a block, bytes a block, unpacker)
_FORMATS: dict[int, tuple[int, int, Callable[[np.ndarray, int, int], Blocks]]] = {
    8: (32, 34, _q8_0),  # Q8_0
    6: (32, 22, _q5_0),  # Q5_0
    12: (256, 144, _q4_k),  # Q4_K
    14: (256, 210, _q6_k),  # Q6_K
}


class GgufBlocks:
    """A model's GGUF file, read for the blocks of its projections by state-dict name
    ("model.layers.3.self_attn.q_proj.weight"); its header is read at the first ask."""

    def __init__(self, path: Callable[[], Path | None]) -> None:
        self._path = path
        self._file: Path | None = None
        self._tensors: dict[str, TensorInfo] | None = None

    def _by_name(self) -> dict[str, TensorInfo]:
        if self._tensors is None:
            self._tensors = {}
            self._file = self._path()
            if self._file is not None:
                try:
                    self._tensors = read_tensor_infos(self._file)
                except (OSError, ValueError, struct.error):  # only loses the speed-up
                    log.warning("GGUF %s unreadable for its blocks", self._file, exc_info=True)
        return self._tensors

    def of(self, name: str) -> Blocks | None:
        """The blocks of the state-dict weight `name`, or None (not a projection or the vocab
        head, no file, a format not supported here)."""
        info = self._by_name().get(gguf_name(name) or "")
        kind = _FORMATS.get(info.ggml_type) if info is not None else None
        if info is None or kind is None or len(info.dims) != 2 or self._file is None:
            return None
        size, nbytes, unpacker = kind
        n_in, out = info.dims  # the fastest dimension first
        if n_in % size or n_in % 32:
            return None
        row = n_in // size * nbytes
        try:
            raw = np.fromfile(self._file, dtype=np.uint8, count=out * row, offset=info.offset)
        except (OSError, ValueError):  # gone or unreadable since: only loses the speed-up
            log.warning("GGUF %s: %s unreadable", self._file, name, exc_info=True)
            return None
        if raw.size != out * row:
            return None
        return unpacker(raw.reshape(out, row), out, n_in)


def matching(
    blocks: Callable[[str], Blocks | None], names: list[str], weights: list[torch.Tensor]
) -> Blocks | None:
    """The blocks of the weights `names` stacked by rows, where every one has blocks that are
    exactly its `weights` tensor; else None."""
    parts = []
    for name, weight in zip(names, weights, strict=True):
        part = blocks(name)
        if part is None or not part.matches(weight):
            if part is not None:
                log.info("%s: the GGUF's blocks are not its weights; read as bf16", name)
            return None
        parts.append(part)
    return stacked(parts)
