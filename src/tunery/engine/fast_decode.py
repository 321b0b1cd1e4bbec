"""A hand-written Gemma 3 forward for decoding: one function over the layers, a preallocated KV
cache, fused projections, optional int8 weight-only matmuls, and LoRA kept unmerged.

The transformers forward spends most of a single-token step in module calls, mask building and
cache bookkeeping; here a step is ~25 tensor ops per layer. Numerics follow the transformers
Gemma 3 code op for op (RMSNorm in fp32 with (1 + w), bf16 rotary tables, gelu-tanh, the
embedding scaled by a bf16 sqrt(hidden)), and a LoRA delta is added as PEFT adds its fp32 adapter:
the input cast to fp32, x @ A.T @ B.T * scaling added to the base output in fp32, cast back.

On a CPU with oneDNN every fused projection and the head also get a copy pre-packed into oneDNN's
blocked layout (`packed_weight`, built once per model and shared with training): a bf16 matmul
then skips the per-call weight reorder, 1.3-1.8x faster for decode-sized inputs, and gives the
same bits as `F.linear` on the plain weights (measured for 1 to 117 rows). It costs a second copy
of the weights (~0.5 GB for gemma-3-270m) and bought 1.45x single-stream decode (13.3 → 19.3
tokens/s with an adapter) and 1.1x for a 32-row batched step. Where the weights are fp32 that
are bf16 values (a CPU without AVX512-BF16), the projections and the head are instead narrowed to
bf16 panels for the native kernels (`narrow_weight`, `Linear`'s `narrow`), with no oneDNN copy.

On a CPU with AMX tiles (bf16 weights, every projection tiled: `step_model`), a decode step is
one call of the C kernels for every layer (`native/decode_step.c`): a 32-row step 27.4 → 21.8
ms, a lone row 12.9 → 9.2 ms, the same bits as the step op by op. Prompts that fit their caches'
rings run through it too, each prompt token a row at its position (`_prefill_by_steps`: 32
prompts of ~11 tokens 210 → 115 ms); they then round as decode steps do (the C attention,
norms and rotation), not op for op as transformers.

`weights="int8"` adds an int8 copy of every projection, one scale per output channel: a decode
step reads half the bytes of bf16 (it is memory-bound); the prompt still runs on the bf16
weights. The kernel is the native one (`native/linear.c`, fp32 activations) where the model runs
in fp32, else `aten._weight_int8pack_mm`. Greedy picks scan the packed head (exact, as for bf16);
without one the tied 262k-token head gets an int8 copy too.

Only what the Gemma 3 text models use is supported; `FastGemma3.supports(config)` says whether a
model qualifies and `FastLora.load` (which reads a PEFT adapter folder itself: one copy of the
weights, bf16, no PEFT modules) returns None for an adapter it cannot run (DoRA, targets outside
the seven projections, ...): the caller then uses the transformers path with PEFT.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import sys
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import torch
import torch.nn.functional as F

from tunery.engine import gguf_blocks, kernel_cache
from tunery.engine.gguf_blocks import Blocks
from tunery.engine.kernel_cache import KernelCache, Packs
from tunery.engine.lora import ADAPTER_CONFIG
from tunery.engine.native import (
    CacheTable,
    Int8Linear,
    LoraDesc,
    NativeKernels,
    PackedBlocks,
    PackedHead,
    PackedLinear,
    StepModel,
)
from tunery.engine.sampling import greedy

Weights = Literal["bf16", "int8"]
T = TypeVar("T")
log = logging.getLogger(__name__)
_PEFT_PREFIX = "base_model.model."  # PEFT's key prefix for a CausalLM's module paths
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Projections that read the same input run as one matmul: (group, members). The group names
# are also `_Layer`'s attribute names for the fused weights.
GROUPS = (("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",)),
           ("gu", ("gate_proj", "up_proj")), ("down", ("down_proj",)))  # fmt: skip
_EMBED = "model.embed_tokens.weight"
_FINAL_NORM = "model.norm.weight"
_HEAD = "lm_head.weight"
_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm")  # fmt: skip
# The config fields the forward reads (the final logit softcap is optional).
_CONFIG_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "hidden_size", "intermediate_size", "sliding_window", "rms_norm_eps",
                  "query_pre_attn_scalar", "layer_types", "rope_parameters")  # fmt: skip
# Segments a LoRA wrapper adds to a wrapped weight's name: PEFT's `base_layer`, Tunery's `base`.
_WRAPPER_SEGMENTS = frozenset({"base_layer", "base"})


def _layer_name(i: int, proj: str) -> str:
    part = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"model.layers.{i}.{part}.{proj}.weight"


def model_tensors(model: Any) -> dict[str, torch.Tensor]:
    """A transformers causal LM's weights by state-dict name, as its files name them: LoRA
    wrappers (PEFT's or Tunery's) are seen through and their own weights left out."""
    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        tensors[".".join(p for p in parts if p not in _WRAPPER_SEGMENTS)] = param
    return tensors


class Linear:
    """y = x @ W.T for a fixed weight given as row blocks (fused projections).

    bf16 runs one matmul on the pre-packed fused copy where there is one, else one per block of
    the model's own tensors; int8 adds one fused int8 copy with a bf16 scale per output channel
    for small batches (decode steps), and keeps the bf16 path for prompts, where the int8 kernel
    is slower than bf16 and less exact. That kernel is the native one (`linear_i8w`: int8 panels,
    fp32 inputs) where `int8_kernels` are given and the weights are fp32, else torch's
    (`_weight_int8pack_mm`, ~2.5 GB/s on a 2-core AVX2 CPU: slower than bf16 there).
    """

    INT8_MAX_ROWS = 8  # at most this many input rows take torch's int8 kernel
    # ... and the native one: up to a batched decode step's rows (`batch_decode.MAX_ROWS`), so
    # each step of a row takes it in any batch (a row's bits do not depend on the others)
    NATIVE_INT8_MAX_ROWS = 32
    # ... and the AMX tiles (which take more, `NativeKernels.TILES_MAX_ROWS`: the whole-step
    # kernel sends them all its rows); more rows take oneDNN's packed copy (see __init__)
    TILED_MAX_ROWS = 64

    def __init__(
        self,
        parts: Sequence[torch.Tensor],
        weights: Weights,
        packed: torch.Tensor | None = None,
        narrow: tuple[NativeKernels, PackedLinear] | None = None,
        int8_kernels: NativeKernels | None = None,
        tiled: tuple[NativeKernels, PackedLinear | PackedBlocks] | None = None,
    ) -> None:
        """`packed`: the parts stacked and pre-packed (`packed_weight`), used instead of them.
        `narrow`: for fp32 parts that are bf16 values, the kernels and the parts stacked in
        bf16 (`narrow_weight`), read instead of them by the kernels' `linear_bf16w`: half the
        bytes of fp32, each output's sum in one order for any number of rows (on 2 AVX2 cores
        0.5-0.6x oneDNN's fp32 time at 1-2 rows, 0.9-1.0x at 32-128, 0.9-1.2x at 512-1024).
        `tiled`: for bf16 parts on a CPU with AMX, the kernels and the parts stacked for their
        `tiles_linear`, up to `TILED_MAX_ROWS` rows: 1-46 rows of Gemma 3 270M's projections in
        0.78-0.84x the time of oneDNN's packed copy, with its bits up to 32 rows. More rows take
        that copy (65-256 rows: 0.85-0.93x the time of 64-row tile calls, 0.68-0.78x torch's
        matmul on the plain parts), so a bf16 model keeps both: its weights' size again; for
        weights that are a GGUF's blocks exactly, the tiles' copy is the blocks' codes
        (`tiles.c`, the same bits in ~0.85x the time at 1-32 rows)."""
        self.parts = [p.detach() for p in parts]
        self.out_features = sum(p.shape[0] for p in self.parts)
        self.packed = packed
        self.narrow = narrow
        self.tiled = tiled
        self.q: torch.Tensor | None = None  # torch's int8 copy
        self.q_native: tuple[NativeKernels, Int8Linear] | None = None
        if weights == "int8":
            w = torch.cat(self.parts).float()
            scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(self.parts[0].dtype)
            w.div_(scale.float()[:, None]).round_().clamp_(-127, 127)
            q = w.to(torch.int8).contiguous()
            if int8_kernels is not None and self.parts[0].dtype == torch.float32:
                self.q_native = (int8_kernels, int8_kernels.int8_linear(q, scale))
            else:
                self.q, self.scale = q, scale.contiguous()

    @property
    def row_exact(self) -> bool:
        """Whether a decode step's row (≤ `NATIVE_INT8_MAX_ROWS`) gets the same bits alone as
        among any others: on the native kernels' panels, int8 or bf16."""
        exact_bf16 = self.narrow is not None or self.tiled is not None
        return self.q_native is not None or (self.q is None and exact_bf16)

    def free_rows(self, dtype: torch.dtype) -> int:
        """Most rows of `dtype` a call (`exact`) takes with each row's bits independent of the
        others and of the call's row count: any number on the native bf16-weight panels (fp32
        rows), up to `TILED_MAX_ROWS` on the AMX tiles (bf16 rows); 0 where neither runs."""
        if self.narrow is not None and dtype == torch.float32:
            return sys.maxsize
        if self.tiled is not None and dtype == torch.bfloat16:
            return self.TILED_MAX_ROWS
        return 0

    @property
    def int8(self) -> bool:
        """Whether inputs of a few rows take an int8 kernel (and more rows another)."""
        return self.q is not None or self.q_native is not None

    def __call__(self, x: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """x (..., in) → (..., out); `exact`: never the int8 copy (a prompt's rows)."""
        shape = x.shape
        rows = x.numel() // shape[-1]
        few = not exact and rows <= self.NATIVE_INT8_MAX_ROWS
        if self.q_native is not None and few and x.dtype == torch.float32:
            kernels, q = self.q_native
            out = kernels.linear_i8w(x.reshape(rows, shape[-1]).contiguous(), q)
            return out.view(*shape[:-1], self.out_features)
        if self.narrow is not None and x.dtype == torch.float32:
            kernels, weight = self.narrow
            out = kernels.linear_bf16w(x.reshape(rows, shape[-1]).contiguous(), weight)
            return out.view(*shape[:-1], self.out_features)
        if self.q is not None and not exact and rows <= self.INT8_MAX_ROWS:
            y: torch.Tensor = torch.ops.aten._weight_int8pack_mm(
                x.reshape(rows, shape[-1]), self.q, self.scale
            )
            return y.view(*shape[:-1], self.out_features)
        if self.tiled is not None and x.dtype == torch.bfloat16 and rows <= self.TILED_MAX_ROWS:
            kernels, tiles = self.tiled
            tiled = kernels.tiles_linear(x.reshape(rows, shape[-1]), tiles)
            if tiled is not None:
                return tiled.view(*shape[:-1], self.out_features)
        if self.packed is not None:
            flat = x.reshape(rows, shape[-1])
            y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, None, "none", [], "")
            return y.view(*shape[:-1], self.out_features)
        if len(self.parts) == 1:
            return F.linear(x, self.parts[0])
        return torch.cat([F.linear(x, p) for p in self.parts], dim=-1)


def packable(weight: torch.Tensor) -> bool:
    """Whether `weight` can be pre-packed for oneDNN (a CPU build with it, bf16 or fp32)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.bfloat16, torch.float32)
        and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """W (out, in) reordered into oneDNN's blocked layout for `mkldnn._linear_pointwise`; None
    where oneDNN refuses it (bf16 on a CPU without AVX512 or AVX-NE-CONVERT)."""
    try:
        packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 64)
    except RuntimeError as e:
        log.debug("%s weight not pre-packed: %s", weight.dtype, e)
        return None
    return packed


class ByTensor(Generic[T]):
    """Values kept per tensor (by identity) while it lives; each made once, under a lock.

    A `WeakKeyDictionary` cannot do this: its lookups compare tensors with `==`, elementwise.
    """

    def __init__(self) -> None:
        self._values: dict[int, T] = {}
        self._lock = threading.Lock()

    def get(self, key: torch.Tensor, make: Callable[[], T]) -> T:
        with self._lock:
            ident = id(key)
            if ident not in self._values:
                self._values[ident] = make()
                weakref.finalize(key, self._values.pop, ident, None)
            return self._values[ident]


# a model's embedding tensor → name → its pre-packed weight; kept while the weights live
_PACKED: ByTensor[dict[str, torch.Tensor | None]] = ByTensor()
_NARROWED: ByTensor[dict[str, PackedLinear | None]] = ByTensor()  # `narrow_weight`'s, as `_PACKED`
# `tiled_weight`'s, as `_PACKED`; those where blocks were asked for under name + BLOCKS_KEY
BLOCKS_KEY = ":blocks"
_TILED: ByTensor[dict[str, PackedLinear | PackedBlocks | None]] = ByTensor()
_PACKED_LOCK = threading.Lock()
# a head tensor → its pack for greedy picks (`native/head.c`), made once: 0.4 s on 2 cores
_HEADS: ByTensor[PackedHead | None] = ByTensor()


def tiled_weight(
    owner: torch.Tensor, name: str, parts: Callable[[], Sequence[torch.Tensor]],
    kernels: NativeKernels, blocks: Callable[[], Blocks | None] | None = None,
    saved: Callable[[], Mapping[str, PackedBlocks | None] | None] | None = None,
    bf16: bool = True,
) -> PackedLinear | PackedBlocks | None:  # fmt: skip
    """As `packed_weight`, packed for the kernels' `tiles_linear` (AMX tiles, bf16); None where
    they do not run here or do not take the shape. Where `blocks()` gives the weight's GGUF
    blocks (which are exactly it), those are packed instead, or taken from what `saved()` gives
    (`kernel_cache`: asked only when this process has none yet; None for a name checked before
    and packed in bf16). `bf16` False: None where there are no blocks (no bf16 copy)."""
    tiles = _TILED.get(owner, dict)
    key = name if blocks is None else f"{name}{BLOCKS_KEY}"  # a forward without blocks: bf16
    with _PACKED_LOCK:
        if key not in tiles:
            tiles[key] = _tiles_pack(name, parts, kernels, blocks, saved, bf16)
        return tiles[key]


def _tiles_pack(
    name: str, parts: Callable[[], Sequence[torch.Tensor]], kernels: NativeKernels,
    blocks: Callable[[], Blocks | None] | None,
    saved: Callable[[], Mapping[str, PackedBlocks | None] | None] | None,
    bf16: bool,
) -> PackedLinear | PackedBlocks | None:  # fmt: skip
    """`tiled_weight`'s pack, made (or read) once."""
    if not kernels.tiles:
        return None
    if blocks is not None:
        kept = saved() if saved is not None else None
        if kept is not None and name in kept:
            packed = kept[name]
        else:
            made = blocks()
            packed = kernels.blocks_pack(made) if made is not None else None
        if packed is not None:
            return packed
    if not bf16:
        return None
    tensors = [p.detach() for p in parts()]
    return kernels.tiles_pack(torch.cat(tensors) if len(tensors) > 1 else tensors[0])


def packed_weight(
    owner: torch.Tensor, name: str, parts: Callable[[], Sequence[torch.Tensor]]
) -> torch.Tensor | None:
    """A model's weight `name`, the tensors `parts()` stacked by rows, pre-packed once per model
    (every `FastGemma3` of the model shares it); None where packing does not apply. `owner` is
    the model's embedding tensor: it names the model and lives exactly as long as its weights."""
    packs = _PACKED.get(owner, dict)
    with _PACKED_LOCK:
        if name not in packs:
            tensors = [p.detach() for p in parts()]
            packs[name] = (
                pack(torch.cat(tensors) if len(tensors) > 1 else tensors[0])
                if packable(tensors[0])
                else None
            )
        return packs[name]


def narrow_weight(
    owner: torch.Tensor,
    name: str,
    parts: Callable[[], Sequence[torch.Tensor]],
    kernels: NativeKernels,
    saved: Callable[[], Mapping[str, PackedLinear | None] | None] | None = None,
) -> PackedLinear | None:
    """A model's fp32 weight `name`, the tensors `parts()` stacked by rows, in bf16 packed for
    `kernels.linear_bf16w`, made once per model (see `packed_weight`), or taken from what
    `saved()` gives (`kernel_cache`; asked only when this process has none yet); None where a
    value is not a bf16 value (narrowing would round it)."""
    packs = _NARROWED.get(owner, dict)
    with _PACKED_LOCK:
        kept = saved() if saved is not None and name not in packs else None
        if kept is not None and name in kept:
            packs[name] = kept[name]
        if name not in packs:
            tensors = [p.detach() for p in parts()]
            stacked = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
            fp32 = stacked.dtype == torch.float32
            packs[name] = kernels.narrow_linear(stacked) if fp32 else None
        return packs[name]


class AdapterDamaged(ValueError):
    """An adapter file that cannot be read or does not fit the base model."""


@dataclass
class _LoraGroup:
    """One fused group's LoRA: u = x @ a.T once for the group (the members' A stacked), then
    each member's u[r_lo:r_hi] @ b.T (scaling folded in) added to its columns of the output.

    The weights are stored in `a.dtype` (bf16 to halve the memory) and computed in fp32, as
    PEFT computes its fp32 adapter: input cast up, delta added in fp32, the sum cast back.
    """

    a: torch.Tensor  # (r_total, in)
    parts: list[tuple[int, int, int, int, torch.Tensor]]  # out_lo, out_hi, r_lo, r_hi, b

    @cached_property
    def desc(self) -> LoraDesc | None:
        """These weights as the native LoRA kernel reads them (None: it cannot, not fp32)."""
        return LoraDesc.of(self.a, self.parts)

    def add_to(
        self, base: torch.Tensor, x: torch.Tensor, native: NativeKernels | None = None
    ) -> torch.Tensor:
        """base + the delta of x; with `native` (decode steps), by its LoRA kernel."""
        desc = self.desc if native is not None else None
        if native is not None and desc is not None and base.dim() == 2:
            return native.lora_add(base, x, [(0, base.shape[0], desc)])
        u = F.linear(x.float(), self.a.float())
        if len(self.parts) == 1 and self.parts[0][1] - self.parts[0][0] == base.shape[-1]:
            b = self.parts[0][4]
            return (base + F.linear(u, b.float())).to(base.dtype)
        for lo, hi, r_lo, r_hi, b in self.parts:
            # `base` is a fresh output of the fused matmul: writing into it is safe.
            base[..., lo:hi] = base[..., lo:hi] + F.linear(u[..., r_lo:r_hi], b.float())
        return base


class FastLora:
    """One adapter's LoRA weights, grouped like the fused projections: one copy, no padding."""

    def __init__(self, layers: list[dict[str, _LoraGroup]]) -> None:
        self.layers = layers

    @cached_property
    def desc_pointers(self) -> torch.Tensor | None:
        """Each layer's groups' `LoraDesc` pointers, (L, 4) int64 in `GROUPS` order (0: no LoRA
        there), as the whole-step kernel reads them (`FastGemma3.native_step`); None where a
        group has no desc (weights the LoRA kernel cannot read in place)."""
        pointers = []
        for groups in self.layers:
            row = []
            for name, _ in GROUPS:
                group = groups.get(name)
                desc = group.desc if group is not None else None
                if group is not None and desc is None:
                    return None
                row.append(0 if desc is None else desc.pointer)
            pointers.append(row)
        return torch.tensor(pointers, dtype=torch.int64)

    @property
    def nbytes(self) -> int:
        return sum(
            g.a.nbytes + sum(p[4].nbytes for p in g.parts)
            for groups in self.layers
            for g in groups.values()
        )

    @classmethod
    def load(
        cls, adapter_dir: Path, fast: FastGemma3, dtype: torch.dtype = torch.float32
    ) -> FastLora | None:
        """A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) for `fast`'s
        model, its weights stored in `dtype`: fp32 by default, as PEFT keeps them (bf16 copies
        would halve the memory, but they round A and s·B, which flipped a near tie on the
        held-out check: "… eighty nine" where the reference said "… seventy nine"). None when
        the adapter uses anything beyond plain LoRA on the seven per-layer projections (the
        caller then runs PEFT); AdapterDamaged (or the reader's own error) when a file is
        unreadable or does not fit the model."""
        read = read_plain_lora(adapter_dir, fast)
        if read is None:
            return None
        weights = {key: {"A": a.to(dtype), "B": b.to(dtype)} for key, (a, b) in read.items()}
        layers: list[dict[str, _LoraGroup]] = []
        for i in range(fast.n_layers):
            groups: dict[str, _LoraGroup] = {}
            for group, members in GROUPS:
                a_parts: list[torch.Tensor] = []
                parts: list[tuple[int, int, int, int, torch.Tensor]] = []
                lo = r_lo = 0
                for m in members:
                    out = fast.out_features[m]
                    found = weights.get((i, m))
                    if found is not None:
                        r = found["A"].shape[0]
                        a_parts.append(found["A"])
                        b = found["B"].to(fast.device).contiguous()
                        parts.append((lo, lo + out, r_lo, r_lo + r, b))
                        r_lo += r
                    lo += out
                if parts:
                    a_all = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts)
                    groups[group] = _LoraGroup(a_all.to(fast.device).contiguous(), parts)
            layers.append(groups)
        return cls(layers)


def read_plain_lora(
    adapter_dir: Path, fast: FastGemma3
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] | None:
    """A PEFT LoRA folder's weights for `fast`'s model: (layer, projection) → (A, s·B) in fp32,
    PEFT's scaling s folded into B. None when the adapter uses anything beyond plain LoRA on the
    seven per-layer projections; AdapterDamaged (or the reader's own error) when a file is
    unreadable or does not fit the model."""
    from safetensors import safe_open

    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise AdapterDamaged(f"{ADAPTER_CONFIG}: {e}") from e
    if not isinstance(config, dict):
        raise AdapterDamaged("adapter_config.json is not an object")
    if (
        config.get("peft_type", "LORA") != "LORA"
        or config.get("use_dora")
        or config.get("lora_bias")
        or config.get("use_qalora")
        or config.get("rank_pattern")
        or config.get("alpha_pattern")
        or config.get("layer_replication")
        or config.get("modules_to_save")
        or config.get("bias", "none") != "none"
        or config.get("fan_in_fan_out")
    ):
        return None
    try:
        rank = int(config["r"])
        alpha = float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterDamaged(f"adapter_config.json: bad r / lora_alpha ({e})") from e
    if rank < 1:
        raise AdapterDamaged(f"adapter_config.json: r = {rank}")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank

    weights: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt", device="cpu") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            module, _, kind = key.removeprefix(_PEFT_PREFIX).rpartition(".lora_")
            target = fast.lora_targets.get(module)
            if not key.startswith(_PEFT_PREFIX) or target is None:
                return None  # another module (embeddings, head, ...): PEFT's job
            if kind not in ("A.weight", "B.weight"):
                return None  # biases, magnitudes, ...
            t = f.get_tensor(key)
            if not t.is_floating_point():
                raise AdapterDamaged(f"{key}: dtype {t.dtype}")
            # An owned fp32 copy: the reader's tensor may map the file, which would stay mapped
            # (and resident) as long as any tensor of it lives.
            t = t.to(torch.float32, copy=True)
            if kind == "B.weight":
                t.mul_(scaling)  # folded in fp32, before any rounding
            weights.setdefault(target, {})[kind[0]] = t
    if not weights:
        return None
    out: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (i, proj), pair in weights.items():
        a, b = pair.get("A"), pair.get("B")
        want_a = (rank, fast.in_features[proj])
        want_b = (fast.out_features[proj], rank)
        if a is None or b is None or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise AdapterDamaged(
                f"layer {i} {proj}: A {None if a is None else tuple(a.shape)}, "
                f"B {None if b is None else tuple(b.shape)}; expected {want_a}, {want_b}"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterDamaged(f"layer {i} {proj}: non-finite weights")
        out[(i, proj)] = (a, b)
    return out


@dataclass
class _Layer:
    sliding: bool
    qkv: Linear
    o: Linear
    gu: Linear
    down: Linear
    ln_in: torch.Tensor  # (1 + w) in fp32, as Gemma3RMSNorm computes it
    ln_post_attn: torch.Tensor
    ln_pre_ff: torch.Tensor
    ln_post_ff: torch.Tensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor

    @property
    def projections(self) -> tuple[Linear, ...]:
        """The fused projections, in `GROUPS` order."""
        return tuple(getattr(self, group) for group, _ in GROUPS)


class KVCache:
    """Per layer K and V: full layers hold every position, sliding layers a ring of `window`."""

    def __init__(self, fast: FastGemma3, batch: int, max_len: int) -> None:
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.sizes: list[int] = []
        for layer in fast.layers:
            size = min(fast.window, max_len) if layer.sliding else max_len
            shape = (batch, fast.n_kv, size, fast.head_dim)
            self.k.append(torch.empty(shape, dtype=fast.dtype, device=fast.device))
            self.v.append(torch.empty(shape, dtype=fast.dtype, device=fast.device))
            self.sizes.append(size)
        self.length = 0  # positions written so far
        self.max_len = max_len
        self._pointers: tuple[list[int], list[int]] | None = None
        self._tables: list[CacheTable] | None = None

    def tables(self) -> list[CacheTable]:
        """Each layer's K and V caches of every batch row, as the native attention reads them;
        made once (not per layer of every step)."""
        if self._tables is None:
            pairs = zip(self.k, self.v, strict=True)
            self._tables = [CacheTable.of(list(k), list(v)) for k, v in pairs]
        return self._tables

    def table_pointers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`tables()` as the whole-step kernel reads them: each layer's K and V pointers and
        ring sizes of every batch row, (L, B) int64 each."""
        tables = self.tables()
        return (torch.stack([t.k for t in tables]), torch.stack([t.v for t in tables]),
                torch.stack([t.sizes for t in tables]))  # fmt: skip

    def pointers(self) -> tuple[list[int], list[int]]:
        """Each layer's K and V data pointers (batch row 0), as the native attention reads a
        batch-1 cache; made once."""
        if self._pointers is None:
            self._pointers = [k.data_ptr() for k in self.k], [v.data_ptr() for v in self.v]
        return self._pointers

    def select(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index`."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]
        self._pointers = self._tables = None

    def repeat(self, n: int) -> None:
        self.k = [k.repeat_interleave(n, dim=0) for k in self.k]
        self.v = [v.repeat_interleave(n, dim=0) for v in self.v]
        self._pointers = self._tables = None


class FastGemma3:
    """Gemma 3 text decoding with a `Gemma3ForCausalLM`'s config and weights.

    The weights come by state-dict name (`tensors`, "model.layers.0.mlp.up_proj.weight", ...):
    from the model's safetensors files, without transformers' modelling code, or from a
    transformers model (`of_model`). They are shared, not copied.
    """

    EXACT_TOP = 32  # int8 head: this many best logits are recomputed with the bf16 weights
    # A row whose int8 scores leave more candidates than this (a flat distribution: none of
    # 120 steps of real text, 9 of 32 rows fed random tokens, measured) takes the bf16 head:
    # their exact logits would cost more (~0.1 ms a thousand).
    CANDIDATES_MAX = 4096
    # The largest top-k the native head gives (a larger one takes the full head's logits).
    TOP_K_MAX = 1024

    @staticmethod
    def supports(config: Any) -> bool:
        """Whether a transformers config (or a model, for its config) describes a model this
        forward runs."""
        config = getattr(config, "config", config)
        if config is None or getattr(config, "model_type", None) != "gemma3_text":
            return False
        if not all(hasattr(config, field) for field in _CONFIG_FIELDS):
            return False
        rope = getattr(config, "rope_parameters", None) or {}
        return (
            not getattr(config, "use_bidirectional_attention", False)
            and getattr(config, "attn_logit_softcapping", None) is None
            and not getattr(config, "attention_bias", False)
            and getattr(config, "hidden_activation", None) == "gelu_pytorch_tanh"
            and all(
                isinstance(rope.get(t), dict) and rope[t].get("rope_type") == "default"
                for t in set(config.layer_types)
            )
        )

    @staticmethod
    def tensor_names(config: Any) -> list[str]:
        """The state-dict names the forward reads (the output head falls back to the tied
        embedding when its own is absent)."""
        names = [_EMBED, _FINAL_NORM]
        for i in range(config.num_hidden_layers):
            names += [_layer_name(i, proj) for proj in PROJECTIONS]
            names += [f"model.layers.{i}.{norm}.weight" for norm in _LAYER_NORMS]
        return names

    @classmethod
    def of_model(cls, model: Any, weights: Weights = "bf16") -> FastGemma3:
        """The forward of a transformers model, seen through any LoRA layers injected in it."""
        return cls(model.config, model_tensors(model), weights)

    def __init__(
        self,
        config: Any,
        tensors: Mapping[str, torch.Tensor],
        weights: Weights = "bf16",
        native: bool = True,
        head_scan: bool = True,
        cache: KernelCache | None = None,
        whole_step: bool = True,
        blocks: Callable[[str], Blocks | None] | None = None,
    ) -> None:
        """`native`: decode steps attend, add LoRA deltas and norm rows with the C kernels
        (`native`) where they build and the weights are bf16 or fp32 on a CPU; else (or False)
        torch. `head_scan`: pack the head for greedy picks (`packed_head`); training, which
        needs the head's logits, does without it. `cache`: where the model's packed weights
        are kept between processes (read if there, else written once built). `whole_step`:
        a decode step is one call of those kernels where it can be (`step_model`); False: one
        call per op, with the same bits (to compare). `blocks`: a weight's GGUF blocks by
        state-dict name (`gguf_blocks.GgufBlocks.of`), which the AMX tiles read instead of its
        bf16 values where they are exactly those."""
        self.weights = weights
        self.whole_step = whole_step
        self.config = config
        embed = tensors[_EMBED]
        self.dtype: torch.dtype = embed.dtype
        self.device: torch.device = embed.device
        self.n_layers = config.num_hidden_layers
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.hidden = config.hidden_size
        self.window = config.sliding_window
        self.eps = config.rms_norm_eps
        self.scaling = config.query_pre_attn_scalar**-0.5
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.embed = embed  # shared with the model: no copy
        cpu = self.device.type == "cpu"
        kernels = NativeKernels.load() if native and cpu else None
        self.native = kernels if self.dtype in (torch.bfloat16, torch.float32) else None
        # Gemma3TextScaledWordEmbedding's scale: an fp32 sqrt(hidden) cast to the weights' dtype
        self.embed_scale = torch.tensor(self.hidden**0.5).to(self.dtype).to(self.device)
        self.inv_freq = {
            t: 1.0
            / (
                config.rope_parameters[t]["rope_theta"]
                ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim)
            ).to(self.device)
            for t in set(config.layer_types)
        }
        q_out = self.n_heads * self.head_dim
        kv_out = self.n_kv * self.head_dim
        self.out_features = {
            "q_proj": q_out, "k_proj": kv_out, "v_proj": kv_out, "o_proj": self.hidden,
            "gate_proj": config.intermediate_size, "up_proj": config.intermediate_size,
            "down_proj": self.hidden,
        }  # fmt: skip
        self.in_features = {
            "q_proj": self.hidden, "k_proj": self.hidden, "v_proj": self.hidden, "o_proj": q_out,
            "gate_proj": self.hidden, "up_proj": self.hidden,
            "down_proj": config.intermediate_size,
        }  # fmt: skip
        # Module path (as PEFT names it in the causal LM) → (layer, projection) a LoRA may target.
        self.lora_targets: dict[str, tuple[int, str]] = {
            _layer_name(i, proj).removesuffix(".weight"): (i, proj)
            for i in range(self.n_layers)
            for proj in PROJECTIONS
        }

        # fp32 weights that are bf16 values (a bf16 checkpoint on a CPU without AVX512-BF16)
        # are read as bf16 by the kernels (`Linear`'s `narrow`), and have no oneDNN copy.
        # With int8 weights too: the prompts run on the bf16 ones.
        narrowing = self.native is not None and self.dtype == torch.float32
        head = tensors.get(_HEAD, embed)  # tied to the embedding unless the model has its own
        want_head = self.softcap is None and head_scan
        disk: list[Packs | None] = []  # the file's packs: read at the first in-memory miss, once

        def saved() -> Packs | None:
            if not disk:
                wanted = head if want_head else None
                native = self.native
                disk.append(kernel_cache.read(cache, native, wanted) if native and cache else None)
            return disk[0]

        def saved_linears() -> dict[str, PackedLinear | None] | None:
            packs = saved()
            return packs.linears if packs is not None else None

        def saved_blocks() -> dict[str, PackedBlocks | None] | None:
            packs = saved()
            return packs.blocks if packs is not None else None

        def linear(
            name: str,
            parts: list[torch.Tensor],
            kind: Weights = weights,
            tiles: bool = True,
            sources: list[str] | None = None,
        ) -> Linear:
            """`tiles`: also the AMX tiles' copy where they run (not for the vocab head, whose
            decode steps take `best_tokens`' int8 scan: 320 MB for Gemma 3 270M's); of the GGUF
            blocks of the weights named `sources` (the parts) where they are exactly those."""
            kernels = self.native
            bf16 = (
                narrow_weight(embed, name, lambda: parts, kernels, saved_linears)
                if narrowing and kernels
                else None
            )
            if bf16 is not None and kernels is not None:
                return Linear(parts, kind, narrow=(kernels, bf16), int8_kernels=kernels)
            packed = packed_weight(embed, name, lambda: parts)
            tiled = None
            if tiles and kernels is not None:
                of = blocks
                exact = (
                    (lambda: gguf_blocks.matching(of, sources, parts))
                    if of is not None and sources is not None
                    else None
                )
                packed_tiles = tiled_weight(
                    embed, name, lambda: parts, kernels, exact, saved_blocks
                )
                tiled = (kernels, packed_tiles) if packed_tiles is not None else None
            return Linear(parts, kind, packed, int8_kernels=kernels, tiled=tiled)

        def projection(i: int, group: str, projs: list[str]) -> Linear:
            names = [_layer_name(i, proj) for proj in projs]
            return linear(f"{i}.{group}", [tensors[n] for n in names], sources=names)

        def norm(i: int, name: str) -> torch.Tensor:
            return _norm_weight(tensors[f"model.layers.{i}.{name}.weight"])

        self.layers: list[_Layer] = []
        for i in range(self.n_layers):
            self.layers.append(
                _Layer(
                    sliding=config.layer_types[i] == "sliding_attention",
                    qkv=projection(i, "qkv", ["q_proj", "k_proj", "v_proj"]),
                    o=projection(i, "o", ["o_proj"]),
                    gu=projection(i, "gu", ["gate_proj", "up_proj"]),
                    down=projection(i, "down", ["down_proj"]),
                    ln_in=norm(i, "input_layernorm"),
                    ln_post_attn=norm(i, "post_attention_layernorm"),
                    ln_pre_ff=norm(i, "pre_feedforward_layernorm"),
                    ln_post_ff=norm(i, "post_feedforward_layernorm"),
                    q_norm=norm(i, "self_attn.q_norm"),
                    k_norm=norm(i, "self_attn.k_norm"),
                )
            )
        self.final_norm = _norm_weight(tensors[_FINAL_NORM])
        self.head_weight = head
        # Greedy picks over the vocab without the full head (`native/head.c`), for bf16 or fp32
        # weights: on a CPU without AVX512-BF16 (fp32 weights) the fp32 head is half a step.
        # Exact for int8 weights too (the argmax of the head's own logits of the hidden state),
        # whose full head then stays bf16 (sampling, or a row the scan leaves).
        self.packed_head: PackedHead | None = None
        self._head_kernels = kernels
        if kernels is not None and want_head:

            def head_pack() -> PackedHead | None:
                packs = saved()
                return packs.head if packs is not None and packs.head else kernels.pack_head(head)

            self.packed_head = _HEADS.get(head, head_pack)
        head_kind: Weights = "bf16" if self.packed_head is not None else weights
        self.head = linear("head", [head], head_kind, tiles=False)
        # Sampled rows' top-k (`top_logits`) reads the head as its GGUF blocks where it is
        # exactly those (Gemma 3 270M's Q8_0: 178 MB a step instead of 335 MB)
        self.head_blocks: PackedBlocks | None = None
        if blocks is not None and kernels is not None and kernels.head_topk and want_head:
            name = _HEAD if _HEAD in tensors else _EMBED
            of = blocks
            head_tiles = tiled_weight(
                embed, "head", lambda: [head], kernels,
                lambda: gguf_blocks.matching(of, [name], [head]), saved_blocks, bf16=False,
            )  # fmt: skip
            self.head_blocks = head_tiles if isinstance(head_tiles, PackedBlocks) else None
        # written where this process packed what the file lacked (it was read, and was not there)
        if kernels is not None and cache is not None and want_head and disk == [None]:
            # the body's panels and the head's pack; the head's own panels (335 MB for Gemma 3
            # 270M) are narrowed again, in ~0.1 s
            body = {n: p for n, p in _NARROWED.get(embed, dict).items() if n != "head"}
            # each projection's blocks pack, or None: checked, and packed in bf16
            tiled = _TILED.get(embed, dict).items() if blocks is not None else ()
            packed = {
                n.removesuffix(BLOCKS_KEY): p if isinstance(p, PackedBlocks) else None
                for n, p in tiled
                if n.endswith(BLOCKS_KEY)
            }
            kernel_cache.write_in_background(cache, kernels, Packs(body, self.packed_head, packed))
        self._rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rope_len = 0

    # -- public --------------------------------------------------------------------------------
    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        self._ensure_rope(max_len)
        return KVCache(self, batch, max_len)

    def prefill(self, ids: Sequence[int], cache: KVCache, lora: FastLora | None) -> torch.Tensor:
        """Run the prompt into an empty `cache`; return the last position's hidden (1, C)."""
        return self.prefill_many([ids], [cache], [lora])

    def prefill_many(
        self,
        prompts: Sequence[Sequence[int]],
        caches: Sequence[KVCache],
        loras: Sequence[FastLora | None],
    ) -> torch.Tensor:
        """Run each prompt into its own empty cache, with its own adapter (or none); return
        each one's last position's hidden (N, C).

        The prompts' rows run as one (1, ΣT, C) sequence through every norm, residual and
        activation, whose rows are each computed alone, and through every projection in calls
        whose rows get the bits they get alone (short prompts share a call, the weights read
        once for them: `_project_prompts`); LoRA runs by the native kernel where there is one
        (one call for all prompts, a row's sums in its adapter's order alone), else per prompt;
        attention per prompt. So a prompt gets the same bits alone or among others."""
        if not len(prompts) == len(caches) == len(loras):
            raise ValueError("one cache and one adapter (or None) per prompt")
        for ids, cache in zip(prompts, caches, strict=True):
            if not 0 < len(ids) <= cache.max_len:
                raise ValueError("a prompt is empty or does not fit its cache")
            self._ensure_rope(cache.max_len)
        fits = [k for k in range(len(prompts)) if self._fits_step(prompts[k], caches[k], loras[k])]
        if fits:  # each prompt by its own rule: the same route alone as among others
            rest = [k for k in range(len(prompts)) if k not in fits]
            out = torch.empty(len(prompts), self.hidden, dtype=self.dtype, device=self.device)
            for ks, run in ((fits, self._prefill_by_steps), (rest, self.prefill_many)):
                if ks:
                    out[ks] = run([prompts[k] for k in ks], [caches[k] for k in ks],
                                  [loras[k] for k in ks])  # fmt: skip
            return out
        lengths = [len(ids) for ids in prompts]
        tokens = torch.tensor([[t for p in prompts for t in p]], device=self.device)
        x = F.embedding(tokens, self.embed) * self.embed_scale  # (1, ΣT, C)
        masks = [self._window_mask(t) for t in lengths]
        native = self.native if self.device.type == "cpu" else None
        positions = torch.cat([torch.arange(t, device=self.device) for t in lengths])
        rope = {k: (c[positions], s_[positions]) for k, (c, s_) in self._rope.items()}

        def project(linear: Linear, x: torch.Tensor, name: str) -> torch.Tensor:
            return _project_each(linear, x, lengths, groups, name, native)

        for i, layer in enumerate(self.layers):
            groups = [{} if lora is None else lora.layers[i] for lora in loras]
            h = _rms(x, layer.ln_in, self.eps)
            qkv = project(layer.qkv, h, "qkv")
            a = self._prompts_attention(i, qkv, lengths, caches, masks, rope)
            o = project(layer.o, a, "o")
            x = x + _rms(o, layer.ln_post_attn, self.eps)
            h = _rms(x, layer.ln_pre_ff, self.eps)
            m = _gelu_times(project(layer.gu, h, "gu"))
            d = project(layer.down, m, "down")
            x = x + _rms(d, layer.ln_post_ff, self.eps)
        for t, cache in zip(lengths, caches, strict=True):
            cache.length = t
        last = torch.tensor(lengths, device=self.device).cumsum(0) - 1
        return _rms(x[0, last], self.final_norm, self.eps)

    def _fits_step(self, ids: Sequence[int], cache: KVCache, lora: FastLora | None) -> bool:
        """Whether the whole-step kernel prefills this prompt (`_prefill_by_steps`): it runs
        here, the adapter has its descs, and the prompt fits every ring of its (batch-1) cache,
        so no position's slot is written over while the prompt is read."""
        return (
            self.step_model is not None
            and (lora is None or lora.desc_pointers is not None)
            and cache.k[0].shape[0] == 1
            and len(ids) <= min(cache.sizes)
        )

    def _prefill_by_steps(
        self,
        prompts: Sequence[Sequence[int]],
        caches: Sequence[KVCache],
        loras: Sequence[FastLora | None],
    ) -> torch.Tensor:
        """`prefill_many` by the whole-step kernel: every prompt token is a row at its position
        on its prompt's cache, with its prompt's adapter. The kernel writes all the rows' keys
        and values before any row attends, and a row attends over its cache's slots up to its
        position: each prompt's causal attention. Rows go `TILES_MAX_ROWS` a call; a row's bits
        depend on its prompt alone, as in a decode step, wherever the calls are cut. Returns
        each prompt's last row (N, C)."""
        assert self.native is not None
        rows = [(k, pos) for k, ids in enumerate(prompts) for pos in range(len(ids))]
        tokens = torch.tensor([t for ids in prompts for t in ids], device=self.device)
        tables = [None if lora is None else lora.desc_pointers for lora in loras]
        hidden = []
        for lo in range(0, len(rows), self.native.TILES_MAX_ROWS):
            part = rows[lo : lo + self.native.TILES_MAX_ROWS]
            owners = [k for k, _ in part]
            ends = list(itertools.accumulate(len(list(g)) for _, g in itertools.groupby(owners)))
            starts = [0, *ends[:-1]]
            spans = self.step_spans(
                [(a, e, tables[owners[a]]) for a, e in zip(starts, ends, strict=True)]
            )
            positions = torch.tensor([pos for _, pos in part], dtype=torch.int64)
            row_caches = cache_pointers([caches[k] for k in owners])
            hidden.append(
                self.native_step(tokens[lo : lo + len(part)], positions, row_caches, spans)
            )
        for ids, cache in zip(prompts, caches, strict=True):
            cache.length = len(ids)
        last = torch.tensor([len(ids) for ids in prompts]).cumsum(0) - 1
        return torch.cat(hidden)[last]

    def _window_mask(self, t: int) -> torch.Tensor | None:
        """A t-token prompt's sliding-window mask; None where the window holds all of it."""
        if t <= self.window or not any(layer.sliding for layer in self.layers):
            return None
        pos = torch.arange(t, device=self.device)
        offset = pos[:, None] - pos[None, :]
        mask: torch.Tensor = (offset >= 0) & (offset < self.window)
        return mask

    def _prompts_attention(
        self,
        i: int,
        qkv: torch.Tensor,
        lengths: Sequence[int],
        caches: Sequence[KVCache],
        masks: Sequence[torch.Tensor | None],
        rope: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Layer i's attention over the prompts' fused qkv (1, ΣT, ·), each prompt over its own
        rows, its K/V written into its empty cache; returns (1, ΣT, nh·hd). The q/k norms and
        RoPE (each row's own position, in `rope`: (ΣT, D) cos and sin) run on all rows at once:
        each value computed alone."""
        layer = self.layers[i]
        cos, sin = rope["sliding" if layer.sliding else "full"]
        q, k, v = self._split_heads(qkv, qkv.shape[1])  # (1, H, ΣT, D)
        q = _rope(_rms(q, layer.q_norm, self.eps), cos, sin)
        k = _rope(_rms(k, layer.k_norm, self.eps), cos, sin)
        out = torch.empty(1, qkv.shape[1], q.shape[1] * q.shape[3], dtype=q.dtype, device=q.device)
        end = 0
        for t, cache, window_mask in zip(lengths, caches, masks, strict=True):
            lo, end = end, end + t
            qp, kp, vp = q[:, :, lo:end], k[:, :, lo:end], v[:, :, lo:end]
            size = cache.sizes[i]
            if t <= size:  # slots 0 … t-1
                cache.k[i][:, :, :t] = kp
                cache.v[i][:, :, :t] = vp
            else:  # a ring keeps the last `size` positions
                keep = range(t - size, t)
                slots = torch.tensor([p % size for p in keep], device=self.device)
                cache.k[i][:, :, slots] = kp[:, :, keep.start :]
                cache.v[i][:, :, slots] = vp[:, :, keep.start :]
            if layer.sliding and window_mask is not None:
                a = F.scaled_dot_product_attention(
                    qp, kp, vp, attn_mask=window_mask, scale=self.scaling, enable_gqa=True
                )
            else:
                a = F.scaled_dot_product_attention(
                    qp, kp, vp, is_causal=t > 1, scale=self.scaling, enable_gqa=True
                )
            out[:, lo:end] = a.transpose(1, 2).reshape(1, t, -1)
        return out

    def step(self, tokens: torch.Tensor, cache: KVCache, lora: FastLora | None) -> torch.Tensor:
        """Feed one token per batch row (B,) at the next position; return hidden (B, C)."""
        pos = cache.length
        if pos >= cache.max_len:
            raise ValueError("the cache is full")
        b = tokens.shape[0]
        if self.step_model is not None and (lora is None or lora.desc_pointers is not None):
            # the whole step in one call
            spans = self.step_spans([(0, b, None if lora is None else lora.desc_pointers)])
            positions = torch.full((b,), pos, dtype=torch.int64)
            hidden = self.native_step(tokens, positions, cache.table_pointers(), spans)
            cache.length = pos + 1
            return hidden
        x = F.embedding(tokens, self.embed) * self.embed_scale  # (B, C)
        rope = {k: (c[pos], s[pos]) for k, (c, s) in self._rope.items()}
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        if self.native is not None:
            positions, tables = torch.full((b,), pos, dtype=torch.int64), cache.tables()
        for i, layer in enumerate(self.layers):
            cos, sin = rope["sliding" if layer.sliding else "full"]
            h = self.norm_rows(x, layer.ln_in)
            qkv = layer.qkv(h)
            if lora is not None and "qkv" in lora.layers[i]:
                qkv = lora.layers[i]["qkv"].add_to(qkv, h, self.native)
            if self.native is not None:  # the kernels the batch scheduler's rows use
                a = self.attend_native(i, qkv, tables[i], positions)
                x = self._after_attention(x, a, layer, i, lora, self.native)
                continue
            q = self.norm_rows(qkv[:, : nh * hd], layer.q_norm, nh).view(b, nh, 1, hd)
            k = self.norm_rows(qkv[:, nh * hd : (nh + nkv) * hd], layer.k_norm, nkv)
            q, k = _rope(q, cos, sin), _rope(k.view(b, nkv, 1, hd), cos, sin)
            v = qkv[:, (nh + nkv) * hd :].view(b, nkv, 1, hd)
            size = cache.sizes[i]
            slot = pos % size
            ck, cv = cache.k[i], cache.v[i]
            ck[:, :, slot : slot + 1] = k
            cv[:, :, slot : slot + 1] = v
            n = min(pos + 1, size)  # every filled slot is inside the window: no mask
            a = F.scaled_dot_product_attention(
                q, ck[:, :, :n], cv[:, :, :n], scale=self.scaling, enable_gqa=True
            )
            x = self._after_attention(x, a.reshape(b, nh * hd), layer, i, lora, self.native)
        cache.length = pos + 1
        return self.norm_rows(x, self.final_norm)

    def attend_native(
        self, i: int, qkv: torch.Tensor, caches: CacheTable, positions: torch.Tensor
    ) -> torch.Tensor:
        """Layer i's attention of a decode step by the native kernels: each row's q/k norms and
        RoPE from its fused qkv (B, ·), its new K/V written into its cache (`caches`, row r's
        (nkv, size, hd) K and V) at `positions[r]`, then attention; (B, nh·hd)."""
        assert self.native is not None
        layer, nh, nkv = self.layers[i], self.n_heads, self.n_kv
        q, k, _ = self.native.qk_norm_rope(
            qkv, (nh, nkv), (layer.q_norm, layer.k_norm), self.eps,
            self._rope["sliding" if layer.sliding else "full"], positions,
        )  # fmt: skip
        v = qkv[:, (nh + nkv) * self.head_dim :]
        return self.native.attend(q, k, v, caches, positions, self.scaling)

    def norm_rows(self, x: torch.Tensor, weight: torch.Tensor, heads: int = 1) -> torch.Tensor:
        """(B, heads·n) → each head's n values RMS-normed (a decode step's rows): by the native
        kernel where there is one."""
        if self.native is not None:
            return self.native.rms_norm(x, weight, self.eps, heads)
        b = x.shape[0]
        return _rms(x.view(b, heads, -1), weight, self.eps).view(b, -1)

    @cached_property
    def batchable(self) -> bool:
        """Whether a decode step gives a row the same bits in any batch of up to
        `Linear.NATIVE_INT8_MAX_ROWS` rows (`batch_decode`): not where torch's int8 kernel
        takes a few rows and the bf16 one more, nor with an int8 head that greedy reads in
        full (its best logits are recomputed by one matmul over all the rows)."""
        return (self.packed_head is not None or not self.head.int8) and all(
            linear.q is None for layer in self.layers for linear in layer.projections
        )

    @cached_property
    def step_model(self) -> StepModel | None:
        """The model as the native whole-step kernel reads it (`native.decode_step`, one call a
        decode step instead of ~300 ops), or None where it does not run: it needs bf16 weights,
        every projection on the AMX tiles, and torch's tanh (`NativeKernels.steps`). Made again
        when the RoPE tables grow."""
        native = self.native
        if not self.whole_step or native is None or not native.steps:
            return None
        if self.dtype != torch.bfloat16:
            return None
        self._ensure_rope(1)
        ff = self.layers[0].gu.out_features // 2
        if ff % 16 or self.head_dim % 16 or self.n_heads % self.n_kv:
            return None
        fields = [len(self.layers), self.hidden, self.n_heads, self.n_kv, self.head_dim, ff]
        fields.append(self.final_norm.data_ptr())
        tensors = [self.final_norm]
        for layer in self.layers:
            packs = [p.tiled[1] for p in layer.projections if p.tiled is not None]
            if len(packs) != len(GROUPS) or any(p.int8 for p in layer.projections):
                return None
            tiles = [p.records if isinstance(p, PackedBlocks) else p.panels for p in packs]
            kinds = [p.kind if isinstance(p, PackedBlocks) else 0 for p in packs]
            cos, sin = self._rope["sliding" if layer.sliding else "full"]
            norms = (layer.ln_in, layer.q_norm, layer.k_norm, layer.ln_post_attn,
                     layer.ln_pre_ff, layer.ln_post_ff)  # fmt: skip
            own = [*tiles, *norms, cos, sin]
            if not all(t.is_contiguous() for t in own):
                return None
            fields += [t.data_ptr() for t in own] + kinds
            tensors += own
        return native.step_model(fields, tensors)

    @cached_property
    def _no_lora_pointers(self) -> torch.Tensor:
        """A span without an adapter as the whole-step kernel reads it: (L, 4) zeros."""
        return torch.zeros(len(self.layers), len(GROUPS), dtype=torch.int64)

    def step_spans(
        self, spans: Sequence[tuple[int, int, torch.Tensor | None]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Runs of rows [lo, hi) sharing an adapter, each with its `FastLora.desc_pointers`
        (None: no adapter), as the whole-step kernel takes them: lo and hi (S,) int64 each and
        the desc pointers (L, 4, S) (0: no LoRA)."""
        lo = torch.tensor([s[0] for s in spans], dtype=torch.int64)
        hi = torch.tensor([s[1] for s in spans], dtype=torch.int64)
        tables = [self._no_lora_pointers if s[2] is None else s[2] for s in spans]
        return lo, hi, torch.stack(tables).permute(1, 2, 0).contiguous()

    def native_step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        caches: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        spans: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """A decode step by the whole-step kernel (`step_model` not None): one token per row (B,)
        at `positions`; `caches` and `spans` as `NativeKernels.decode_step` takes them. The same
        bits as the step op by op. Returns the hidden states (B, C)."""
        assert self.native is not None and self.step_model is not None
        x = (F.embedding(tokens, self.embed) * self.embed_scale).contiguous()
        return self.native.decode_step(
            self.step_model, self.eps, self.scaling, x, positions, caches, spans
        )

    @cached_property
    def lone_row_exact(self) -> bool:
        """Whether a lone row's decode step gets the bits it gets among others as it is, not
        padded to two rows (`batch_decode.step_rows`): every projection on the native panels
        (`Linear.row_exact`) and the native attention, norms and LoRA."""
        return self.native is not None and all(
            linear.row_exact for layer in self.layers for linear in layer.projections
        )

    def best_tokens(self, hidden: torch.Tensor) -> list[int]:
        """(B, C) → each row's greedy token: the argmax of its exact fp32 logits (rounded to
        bf16 for bf16 weights, as their head's are; the first of equal ones, as greedy picks) by
        the packed int8 head where there is one; else, or for a row it leaves to others (flat,
        or not finite), the argmax of the full head's logits. Which way a row takes depends on
        that row alone, so it gets the same token in any batch."""
        if self.packed_head is None or self._head_kernels is None:
            return self._full_head_best(hidden)
        best = self._head_kernels.best_tokens(
            hidden.contiguous(), self.packed_head, self.CANDIDATES_MAX
        )
        lost = [j for j, token in enumerate(best) if token < 0]
        if lost:
            for j, token in zip(lost, self._full_head_best(hidden[lost]), strict=True):
                best[j] = token
        return best

    def top_logits(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C) → each row's k largest logits, fp32 and largest first, and their tokens: what
        a top-k sampler needs. On AMX tiles in one read of a bf16 head, no (B, V) logits (the
        first of equal ones first: the first j of a row's k are its j largest, the same in any
        batch); else, or for a row it leaves, the topk of the full head's logits."""
        k = min(k, self.head_weight.shape[0])
        top = None
        if self.native is not None and self.softcap is None and k <= self.TOP_K_MAX:
            head = self.head_blocks if self.head_blocks is not None else self.head_weight
            top = self.native.top_logits(hidden, head, k)
        if top is None:
            return self._full_head_top(hidden, k)
        values, tokens = top
        lost = (tokens[:, 0] < 0).nonzero().flatten().tolist()
        if lost:
            values[lost], tokens[lost] = self._full_head_top(hidden[lost], k)
        return values, tokens

    def _full_head_top(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k largest of the full head's logits (`_full_head_logits`)."""
        values, tokens = self._full_head_logits(hidden).topk(k, dim=-1)
        return values.float(), tokens

    def _full_head_best(self, hidden: torch.Tensor) -> list[int]:
        """Greedy over the full head's logits (`_full_head_logits`)."""
        logits = self._full_head_logits(hidden)
        return self.native.argmax(logits) if self.native is not None else greedy(logits).tolist()

    def _full_head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, V) logits of the full head in the weights' dtype; a lone row padded to two for
        the matmul (see `batch_decode.pad_rows`), so it rounds as among others."""
        logits = self.logits(hidden.repeat(2, 1) if hidden.shape[0] == 1 else hidden, False)
        return logits[: hidden.shape[0]]

    def logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """(B, C) → (B, V) logits, in float32 or (`float32=False`) the weights' dtype, whose
        conversion to float32 is exact but costs ~8 ms for a 32-row batch on a CPU."""
        logits = self.head(hidden)
        if self.head.int8:
            # The int8 head's best candidates get their exact bf16 logits back, so greedy picks
            # what the bf16 head would whenever the winner is among them (a gap of ~0.1 can
            # reorder int8 logits, a much larger one cannot).
            top = logits.topk(self.EXACT_TOP, dim=-1).indices  # (B, k)
            rows = self.head_weight[top]  # (B, k, C)
            exact = torch.matmul(rows, hidden.unsqueeze(-1)).squeeze(-1)  # (B, k)
            logits = logits.scatter(-1, top, exact.to(logits.dtype))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float() if float32 else logits

    # -- internals -----------------------------------------------------------------------------
    def _after_attention(
        self,
        x: torch.Tensor,
        a: torch.Tensor,
        layer: _Layer,
        i: int,
        lora: FastLora | None,
        native: NativeKernels | None = None,
    ) -> torch.Tensor:
        """The rest of layer i; `native`: LoRA by its kernel (decode steps)."""
        groups = lora.layers[i] if lora is not None else {}

        def norm(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return _rms(t, weight, self.eps) if native is None else self.norm_rows(t, weight)

        o = layer.o(a)
        if "o" in groups:
            o = groups["o"].add_to(o, a, native)
        x = x + norm(o, layer.ln_post_attn)
        h = norm(x, layer.ln_pre_ff)
        gu = layer.gu(h)
        if "gu" in groups:
            gu = groups["gu"].add_to(gu, h, native)
        m = _gelu_times(gu)
        d = layer.down(m)
        if "down" in groups:
            d = groups["down"].add_to(d, m, native)
        return x + norm(d, layer.ln_post_ff)

    def _split_heads(
        self, qkv: torch.Tensor, t: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        q = qkv[..., : nh * hd].view(1, t, nh, hd).transpose(1, 2)
        k = qkv[..., nh * hd : (nh + nkv) * hd].view(1, t, nkv, hd).transpose(1, 2)
        v = qkv[..., (nh + nkv) * hd :].view(1, t, nkv, hd).transpose(1, 2)
        return q, k, v

    def _ensure_rope(self, length: int) -> None:
        """cos/sin tables for positions < length, computed as Gemma3RotaryEmbedding does."""
        if length <= self._rope_len:
            return
        length = max(length, 2 * self._rope_len, 512)
        positions = torch.arange(length, device=self.device).float()
        for t, inv_freq in self.inv_freq.items():
            freqs = positions[:, None] * inv_freq.float()
            emb = torch.cat((freqs, freqs), dim=-1)
            key = "sliding" if t == "sliding_attention" else "full"
            self._rope[key] = (emb.cos().to(self.dtype), emb.sin().to(self.dtype))
        self._rope_len = length
        self.__dict__.pop("step_model", None)  # it points into the tables: made again


def cache_pointers(caches: Sequence[KVCache]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each layer's K and V data pointers and ring sizes of batch-1 caches, one row each, (L, B)
    int64 each: as the whole-step kernel and `CacheTable` read them."""
    pointers = [c.pointers() for c in caches]
    k = torch.tensor([p[0] for p in pointers], dtype=torch.int64).t().contiguous()
    v = torch.tensor([p[1] for p in pointers], dtype=torch.int64).t().contiguous()
    sizes = torch.tensor([c.sizes for c in caches], dtype=torch.int64).t().contiguous()
    return k, v, sizes


def _norm_weight(weight: torch.Tensor) -> torch.Tensor:
    return (1.0 + weight.detach().float()).contiguous()


def _project_each(
    linear: Linear,
    x: torch.Tensor,
    lengths: Sequence[int],
    groups: Sequence[dict[str, _LoraGroup]],
    name: str,
    native: NativeKernels | None = None,
) -> torch.Tensor:
    """`linear` of prompts' rows x (1, ΣT, in) (`_project_prompts`), each prompt's slice plus
    its own adapter's delta (where it has `name`): with `native`, by its LoRA kernel in one call
    for all prompts (each row's sums in its adapter's order alone), else as its `add_to`
    computes it alone."""
    base = _project_prompts(linear, x, lengths)
    if not any(name in g for g in groups):
        return base
    descs = [g[name].desc if name in g else None for g in groups]
    if native is not None and all(g[name].desc is not None for g in groups if name in g):
        base = base.contiguous()
        ends = list(itertools.accumulate(lengths))
        spans = [(end - t, end, d) for t, end, d in zip(lengths, ends, descs, strict=True)]
        native.lora_add(base.view(-1, base.shape[-1]), x.reshape(-1, x.shape[-1]), spans)
        return base
    pieces = zip(_slices(base, lengths), _slices(x, lengths), groups, strict=True)
    return torch.cat([g[name].add_to(b, p) if name in g else b for b, p, g in pieces], dim=1)


# Prompts of at most this many rows share matmuls: oneDNN's bf16 matmul gives a row the same
# bits in any call of 2 to 32 rows on every CPU measured (with AMX tiles also in a 1-row call),
# but not across that bound on a CPU with AMX (a 72-row call rounds some rows unlike an 8-row
# one: from 33 rows up it blocks the rows otherwise).
PROMPT_BLOCK = 32


def _project_prompts(linear: Linear, x: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """`linear` of prompts' rows x (1, ΣT, in), each row's bits fixed by its own prompt alone,
    whatever prompts it comes with. Where the linear's kernel gives a row the same bits in any
    call (`Linear.free_rows`), the prompts that fit one call alone are cut into calls of that
    many rows, wherever a cut falls. Otherwise a prompt longer than `PROMPT_BLOCK` rows is one
    call of its own (its length picks the kernel, as when it comes alone); shorter ones run
    together, in order, in calls of at most `PROMPT_BLOCK` rows and at least two (a lone row is
    padded: a 1-row call takes another kernel on some CPUs). Prompts never take int8 weights
    (`exact`): those are for decode steps."""
    free = linear.free_rows(x.dtype)
    calls: list[tuple[int, int, bool]] = []  # row ranges, one matmul each; whether free
    start = 0
    for t in lengths:
        end = start + t
        if t <= free and calls and calls[-1][2]:  # free rows, together: any cut will do
            calls[-1] = (calls[-1][0], end, True)
        elif t <= free:
            calls.append((start, end, True))
        elif calls and not calls[-1][2] and end - calls[-1][0] <= PROMPT_BLOCK:  # together
            calls[-1] = (calls[-1][0], end, False)
        else:
            calls.append((start, end, False))
        start = end
    outs = []
    for lo, hi, exact_rows in calls:
        step = free if exact_rows else hi - lo
        for a in range(lo, hi, step):
            b = min(hi, a + step)
            rows = x[:, a:b] if b - a > 1 or exact_rows else x[:, a:b].repeat(1, 2, 1)
            outs.append(linear(rows, exact=True)[:, : b - a])
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _slices(x: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    """x (1, ΣT, ·) cut into each prompt's (1, T, ·) view."""
    ends = list(itertools.accumulate(lengths))
    return [x[:, end - t : end] for t, end in zip(lengths, ends, strict=True)]


def _gelu_times(gu: torch.Tensor) -> torch.Tensor:
    """Gemma's MLP activation of the fused gate/up output: gelu-tanh(gate) · up."""
    gate, up = gu.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight).type_as(x)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)
