"""A hand-written Gemma 3 training forward: packed sequences, fused LoRA groups, pre-packed kernels.

The transformers forward spends a small training step in module calls, mask building and autograd
bookkeeping for ~60 ops per layer, and pads every row of a batch to the longest. Here:

- **Packing:** a batch's examples are laid end to end in one row, each with its own positions and
  a block-diagonal causal mask, so no FLOP is spent on padding.
- **Fused groups:** projections that read the same input (q/k/v, gate/up) are one matmul over a
  concatenated weight, and their LoRA A matrices one matmul too; forward and backward of a group
  are written out by hand (`_LoraGroupFn`), so autograd sees one node per group.
- **Pre-packed weights:** on a CPU with oneDNN the frozen weights are reordered once into oneDNN's
  blocked layout, for the forward (W) and for the backward (Wᵀ): a bf16 matmul with few rows then
  skips the per-call reorder, 1.5-3× faster for these shapes. They are built once per base model
  and kept while the model lives; the forward's copies are the decode path's (`fast_decode`).
  Where the weights are fp32 that are bf16 values (a CPU without AVX512-BF16), the forward reads
  the decode path's bf16 panels and the backward its own panels of Wᵀ (`FrozenWeight`): half the
  bytes, 1.4-2x oneDNN's fp32 speed at 16-51 rows (a seed-sized step), on par at 512.
- **Label-only logits:** the 262k-token head runs only at positions that predict a label; for a
  batch with few of them (a seed-sized step) each row's loss and gradient come from one native
  pass over the head's weights (`TrainingHead`, `native/head_loss.c`) instead of two matmuls,
  the gradient over the softmax terms that matter only (`GRAD_SKIPPED_MASS`).

Numerics follow the transformers Gemma 3 code (see `fast_decode`); the LoRA delta is computed in
the activation dtype from fp32 master weights, as `lora.LoraLinear` does, except in a step of few
tokens, where it is computed in fp32 (`LORA_FP32_MAX_ROWS`: faster there, and closer), by the
native kernels where they take the group's shapes (`native/lora_train.c`: forward and backward
each one call).
`FastGemma3.supports()` says whether a model qualifies; the caller otherwise trains through the
transformers modules.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tunery.engine.data import PackedBatch, padded
from tunery.engine.fast_decode import (
    GROUPS,
    PROJECTIONS,
    ByTensor,
    FastGemma3,
    Linear,
    _gelu_times,
    _rope,
    pack,
    packable,
)
from tunery.engine.kernel_cache import KernelCache
from tunery.engine.lora import LoraLinear
from tunery.engine.native import LoraDesc, NativeKernels, PackedLinear
from tunery.engine.specs import LoraSpec


class FrozenWeight:
    """A frozen weight W (out, in) ready for `x @ W.T` (forward) and `g @ W` (backward).

    Given `kernels` with AMX tiles and a bf16 W of whole tiles, both read copies packed for
    `tiles_gemm` (W, shared with the decode path's tiles where it has them, and Wᵀ:
    `tiles_gemm.c`), which needs no build per row count as oneDNN does.
    Else the forward is the decode path's `Linear` (its pre-packed or narrowed copy, shared), and
    the backward reads Wᵀ: in bf16 panels where the forward's are narrowed (`linear.c`: fp32
    weights that are bf16 values) and W's rows are few enough for a panel of them to stay in
    cache, else pre-packed by oneDNN on a CPU, else the stacked plain weight.
    """

    # The most rows of W (Wᵀ's inputs) the backward reads as panels: a panel widened to fp32 is
    # rows x 3 vectors, 384 KB at 4096 rows with AVX2; the 262k-row vocab head stays on oneDNN.
    NARROW_MAX_ROWS = 4096

    def __init__(self, linear: Linear, kernels: NativeKernels | None = None) -> None:
        self._linear = linear
        self.out_features = linear.out_features
        parts = linear.parts
        self.in_features = parts[0].shape[1]
        weight = self._stacked()
        self._bwd: torch.Tensor | None = None
        self._bwd_narrow: tuple[NativeKernels, PackedLinear] | None = None
        self._plain: torch.Tensor | None = weight
        self._tiles: tuple[NativeKernels, PackedLinear, PackedLinear] | None = None
        if kernels is not None and kernels.tiles and weight.dtype == torch.bfloat16:
            # the decode path's tiles copy where it is W in bf16 (the same layout), else one more
            shared = linear.tiled[1] if linear.tiled is not None else None
            if isinstance(shared, PackedLinear) and shared.n_out % 32 == 0:
                fwd: PackedLinear | None = shared
            else:
                fwd = kernels.gemm_pack(weight)
            bwd = kernels.gemm_pack(weight.t().contiguous()) if fwd is not None else None
            if fwd is not None and bwd is not None:
                self._tiles = (kernels, fwd, bwd)
                self._plain = None
                return
        if linear.narrow is not None and self.out_features <= self.NARROW_MAX_ROWS:
            kernels = linear.narrow[0]
            weight_t = kernels.narrow_linear(weight.t())  # bf16 values: never None
            self._bwd_narrow = (kernels, weight_t) if weight_t is not None else None
        if self._bwd_narrow is None and packable(weight):
            self._bwd = pack(weight.t())
        if self._bwd is not None or self._bwd_narrow is not None:
            self._plain = None  # a fused group's stacked weight is a copy: not kept

    @property
    def tile_kernels(self) -> NativeKernels | None:
        """The kernels where this weight's products run on AMX tiles (else None)."""
        return self._tiles[0] if self._tiles is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) → (N, out)."""
        if self._tiles is not None:
            kernels, fwd, _ = self._tiles
            y = kernels.tiles_gemm(x, fwd)
            if y is not None:
                return y
        packed = self._linear.packed
        if packed is not None and _row_block(x, self.out_features):
            return _packed_linear(x, packed, self.out_features)
        return self._linear(x)

    def lora_forward(
        self,
        x: torch.Tensor,
        a: torch.Tensor,
        bs: Sequence[torch.Tensor],
        blocks: Sequence[tuple[int, int, int, int]],
        scaling: float,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """x Wᵀ + s·(x Aᵀ) Bᵀ as one product on the tiles (`tiles_gemm`'s second one: u = x Aᵀ
        times the members' s·B, each in its block of outputs and ranks), for a group's A stacked
        (R, in) and its Bs in `blocks` (out_lo, out_hi, r_lo, r_hi): (y, u (N, R)); None where
        the tiles do not take it (no tiles here, or not bf16)."""
        if self._tiles is None or x.dtype != torch.bfloat16 or a.dtype != torch.bfloat16:
            return None
        kernels, fwd, _ = self._tiles
        ranks = a.shape[0]
        width = -(-ranks // 32) * 32  # the tiles take inputs 32 at a time: zero ranks after
        u = x @ F.pad(a, (0, 0, 0, width - ranks)).t()  # (N, width)
        delta = torch.zeros(self.out_features, width, dtype=torch.bfloat16)
        for (lo, hi, r_lo, r_hi), b in zip(blocks, bs, strict=True):
            torch.mul(b, scaling, out=delta[lo:hi, r_lo:r_hi])
        packed = kernels.gemm_pack(delta)
        y = kernels.tiles_gemm(x, fwd, (u, packed)) if packed is not None else None
        return (y, u[:, :ranks]) if y is not None else None

    def lora_backward(
        self, g: torch.Tensor, gu: torch.Tensor, a: torch.Tensor, scaling: float
    ) -> torch.Tensor | None:
        """g W + s·gu A (gu (N, R): g's products with the Bs) as one product on the tiles (s·Aᵀ
        as the second one's weight); None where they do not take it."""
        if self._tiles is None or g.dtype != torch.bfloat16 or gu.dtype != torch.bfloat16:
            return None
        kernels, _, bwd = self._tiles
        ranks = a.shape[0]
        width = -(-ranks // 32) * 32
        up = torch.zeros(self.in_features, width, dtype=torch.bfloat16)
        torch.mul(a.t(), scaling, out=up[:, :ranks])
        packed = kernels.gemm_pack(up)
        if packed is None:
            return None
        return kernels.tiles_gemm(g, bwd, (F.pad(gu, (0, width - ranks)), packed))

    def _stacked(self) -> torch.Tensor:
        parts = self._linear.parts
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def backward(self, g: torch.Tensor) -> torch.Tensor:
        """g (N, out) → (N, in)."""
        if self._tiles is not None:
            kernels, _, bwd = self._tiles
            y = kernels.tiles_gemm(g, bwd)
            # none: no rows, rows of another dtype, or out of memory
            return y if y is not None else g @ self._stacked().to(g.dtype)
        if self._bwd_narrow is not None:
            kernels, weight_t = self._bwd_narrow
            return kernels.linear_bf16w(g.contiguous(), weight_t)
        if self._plain is not None:
            return g @ self._plain
        assert self._bwd is not None
        return _packed_linear(g, self._bwd, self.in_features)


# oneDNN's bf16 matmul on a pre-packed weight picks its blocking by the row count, and for a
# narrow output (at most 1024 columns) it picks badly from several hundred rows on. Same-run
# rates on an AMX Xeon (2 threads), Gemma 3 270M's shapes, TFLOP/s at once -> in even blocks:
# down (2048 -> 640) and gate/up backward (4096 -> 640) at 576-1216 rows 1.0-1.2 -> 1.4-1.7 by
# ~256 rows (320 rows at once: 1.8, where blocks lose); qkv backward (1536 -> 640) at 768-1024
# rows 1.2-1.3 -> 1.8-2.0 by ~192, o (1024 -> 640) 1.3-1.4 -> 1.5-1.6, its backward (640 ->
# 1024) 1.4-1.5 -> 1.7 (576 rows at once: 2.4, where blocks lose).
ROW_BLOCKS_MAX_OUT = 1024


def _row_block(x: torch.Tensor, out_features: int) -> int:
    """The rows of a block of `x @ Wᵀ` (W out_features × x's width, pre-packed), or 0 where it
    goes in one call."""
    if x.dtype != torch.bfloat16 or x.dim() != 2 or out_features > ROW_BLOCKS_MAX_OUT:
        return 0
    rows, width = x.shape
    if width >= 2048:
        return 256 if rows > 512 else 0
    return 192 if rows > 640 else 0


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x (N, in) @ Wᵀ for W pre-packed by oneDNN → (N, out_features): in one call, or in blocks
    of `_row_block` rows (the last one the rest) where it gives one: with a step's rows a
    multiple of 64 (`_row_multiple`), the blocks have few row counts for oneDNN to build for."""
    block = _row_block(x, out_features)
    if not block:
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return y
    out = torch.empty(x.shape[0], out_features, dtype=x.dtype, device=x.device)
    x = x.contiguous()
    for lo in range(0, x.shape[0], block):
        out[lo : lo + block] = torch.ops.mkldnn._linear_pointwise(
            x[lo : lo + block], packed, None, "none", [], ""
        )
    return out


class _LoraGroupFn(torch.autograd.Function):
    """y = x Wᵀ + s·(x Aᵀ) Bᵀ for a fused group; gradients for A and B only.

    A is the members' A matrices stacked (R, in), so x is read once for all of them; each
    member's B adds its delta to its own block of columns (a block-diagonal B would cost a copy
    and twice the multiply-adds). A and the Bs come in x's dtype, or in fp32 (the master weights
    themselves) for the products in fp32 (`LORA_FP32_MAX_ROWS`); the gradients leave in fp32.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: FrozenWeight,
        scaling: float,
        low: _Low,
        *ab: torch.Tensor,
    ) -> torch.Tensor:
        """`ab` are the fp32 A₁, B₁, A₂, B₂... (for autograd); `low` is (A stacked, the Bs,
        block bounds) in the products' dtype, and the kernels with the group's desc where they
        compute the fp32 products (`_Group._native`)."""
        a, bs, blocks, native = low
        ctx.weight, ctx.scaling, ctx.blocks, ctx.native = weight, scaling, blocks, native
        fused = weight.lora_forward(x, a, bs, blocks, scaling) if a is not None else None
        if fused is not None:  # the delta in the frozen product's own sums
            ctx.save_for_backward(x, a, fused[1], *bs)
            return fused[0]
        y = weight.forward(x)  # (N, out), a fresh tensor
        if native is not None:  # one call for the products (fp32), the delta rounded once
            kernels, desc = native
            ctx.save_for_backward(x, kernels.lora_train_forward(y, x, desc, scaling))
            return y
        assert a is not None
        xa = x.to(a.dtype)
        u = xa @ a.t()  # (N, R)
        for (lo, hi, r_lo, r_hi), b in zip(blocks, bs, strict=True):
            _add_product(y[:, lo:hi], u[:, r_lo:r_hi], b.t(), scaling)
        ctx.save_for_backward(xa, a, u, *bs)
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        s = ctx.scaling
        g = g.contiguous()
        if ctx.native is not None:  # one call for the LoRA's four products
            x, u = ctx.saved_tensors
            kernels, desc = ctx.native
            gx = ctx.weight.backward(g) if ctx.needs_input_grad[0] else None
            grad_a, grad_bs = kernels.lora_train_backward(g, x, u, desc, s, gx)
            out: list[torch.Tensor | None] = [gx, None, None, None]
            for (_, _, r_lo, r_hi), grad_b in zip(ctx.blocks, grad_bs, strict=True):
                out += [grad_a[r_lo:r_hi], grad_b]
            return tuple(out)
        x, a, u, *bs = ctx.saved_tensors
        ga = g.to(a.dtype)
        blocks = zip(ctx.blocks, bs, strict=True)
        parts = [(ga[:, lo:hi], u[:, r_lo:r_hi], b) for (lo, hi, r_lo, r_hi), b in blocks]
        gu = torch.cat([g_m @ b for g_m, _, b in parts], dim=1) if len(parts) > 1 else ga @ bs[0]
        tiles = ctx.weight.tile_kernels
        grad_a = _weight_grad(tiles, gu, x, s)  # (R, in)
        gx = None  # the input's gradient where wanted (not below the first adapted layer)
        if ctx.needs_input_grad[0]:  # on the tiles, the LoRA's term in the same sums
            gx = ctx.weight.lora_backward(g, gu, a, s)
            if gx is None:
                gx = _add_product(ctx.weight.backward(g), gu, a, s)
        out = [gx, None, None, None]
        for (_, _, r_lo, r_hi), (g_m, u_m, _) in zip(ctx.blocks, parts, strict=True):
            out += [grad_a[r_lo:r_hi], _weight_grad(tiles, u_m, g_m, s, transposed=True)]
        return tuple(out)


def _weight_grad(
    kernels: NativeKernels | None,
    u: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    transposed: bool = False,
) -> torch.Tensor:
    """scale · uᵀ g (r, m) in fp32 for a LoRA weight's gradient (u (N, r), g (N, m)), or its
    transpose (m, r) where `transposed` (laid out so on the tiles: a B's gradient with no copy
    after): a sum over the step's rows, on AMX tiles where they run (`lora_tiles.c`: 832 rows,
    16 x 2048, 183 µs where oneDNN's bf16 matmul took 240-450), else a matmul in u's dtype. (uᵀ
    g rather than gᵀ u: 0.77x the time on oneDNN, 768 rows, 2048 x 16, bf16 on AMX.)"""
    if kernels is not None:
        c = kernels.lora_tn(u, g, scale, transposed)
        if c is not None:
            return c
    c = (u.t() @ g).float().mul_(scale)
    return c.t() if transposed else c


def _add_product(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """out += alpha · (x @ w) in place; a product in another dtype than `out` (fp32 into bf16)
    is computed in its own and rounded once into `out`. Returns `out`."""
    if out.dtype == x.dtype:
        return out.addmm_(x, w, alpha=alpha)
    return out.add_(x @ w, alpha=alpha)


class _FrozenLinearFn(torch.autograd.Function):
    """x Wᵀ for a frozen W with no LoRA: only the input's gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: FrozenWeight) -> torch.Tensor:
        ctx.weight = weight
        return weight.forward(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.weight.backward(g.contiguous()), None


@dataclass
class _Group:
    weight: FrozenWeight
    params: list[torch.nn.Parameter]  # the members' A₁, B₁, A₂, B₂... (empty: no LoRA)
    scaling: float
    blocks: list[tuple[int, int, int, int]]  # each member's (out_lo, out_hi, r_lo, r_hi)
    kernels: NativeKernels | None = None  # for the products in fp32 (`lora_train.c`)
    _desc: tuple[int, LoraDesc | None] | None = field(default=None, repr=False)

    def __call__(self, x: torch.Tensor, cast: _Cast) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.params:
            native = self._native(cast, flat)
            if native is not None:  # the kernels read the weights through the group's desc
                low: _Low = (None, [], self.blocks, native)
            else:  # the members' As lie one after another in the flat buffer: stacked, a view
                a = cast.stacked(self.params[0::2])
                low = (a, [cast.of(p) for p in self.params[1::2]], self.blocks, None)
            y = _LoraGroupFn.apply(flat, self.weight, self.scaling, low, *self.params)  # type: ignore[no-untyped-call]
        else:
            y = _FrozenLinearFn.apply(flat, self.weight)  # type: ignore[no-untyped-call]
        return y.view(*shape[:-1], self.weight.out_features)  # type: ignore[no-any-return]

    def _native(self, cast: _Cast, x: torch.Tensor) -> tuple[NativeKernels, LoraDesc] | None:
        """The kernels and this group's desc where they run its fp32 products on x's rows (the
        desc made once: an fp32 cast is the parameters' buffer itself, which stays put)."""
        kernels = self.kernels
        if kernels is None or cast.low.dtype != torch.float32 or x.stride(-1) != 1:
            return None
        if x.dtype not in (torch.bfloat16, torch.float32):
            return None
        key = cast.low.data_ptr()
        if self._desc is None or self._desc[0] != key:
            a = cast.stacked(self.params[0::2])
            bs = [cast.of(p) for p in self.params[1::2]]
            blocks = zip(self.blocks, bs, strict=True)
            parts = [(lo, hi, r_lo, r_hi, b) for (lo, hi, r_lo, r_hi), b in blocks]
            desc = LoraDesc.of(a, parts)
            fits = desc is not None and kernels.lora_train_fits(desc, x.dtype)
            self._desc = (key, desc if fits else None)
        desc = self._desc[1]
        return None if desc is None else (kernels, desc)


# what `_LoraGroupFn` reads of a group's LoRA weights: A stacked and the Bs in the products'
# dtype (or None and [] where the kernels read them), the members' column and rank bounds, and
# the kernels with the group's desc where they compute the products
_Low = tuple[
    torch.Tensor | None,
    list[torch.Tensor],
    list[tuple[int, int, int, int]],
    tuple[NativeKernels, LoraDesc] | None,
]


class _FlatParams:
    """Parameters re-pointed into one flat buffer, in the given order, so all of them change
    dtype in one cast."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.flat = torch.cat([p.detach().reshape(-1) for p in params])
        self.offsets: dict[int, int] = {}
        offset = 0
        for p in params:
            p.data = self.flat[offset : offset + p.numel()].view_as(p)
            self.offsets[id(p)] = offset
            offset += p.numel()

    def cast(self, dtype: torch.dtype) -> _Cast:
        """The parameters' current values in `dtype` (the buffer itself when already so)."""
        return _Cast(self.flat.to(dtype), self.offsets)


@dataclass(frozen=True)
class _Cast:
    """One cast of a `_FlatParams` buffer, read as views."""

    low: torch.Tensor
    offsets: dict[int, int]

    def of(self, p: torch.Tensor) -> torch.Tensor:
        start = self.offsets[id(p)]
        return self.low[start : start + p.numel()].view_as(p)

    def stacked(self, ps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Parameters of one width that lie one after another in the buffer, as one matrix."""
        start = self.offsets[id(ps[0])]
        rows = sum(p.shape[0] for p in ps)
        return self.low[start : start + rows * ps[0].shape[1]].view(rows, ps[0].shape[1])


class _BaseKernels:
    """A base model's frozen weights as fused matmul operands for forward and backward."""

    def __init__(self, fast: FastGemma3) -> None:
        self.groups = [
            {group: FrozenWeight(getattr(layer, group), fast.native) for group, _ in GROUPS}
            for layer in fast.layers
        ]
        self.head = TrainingHead(fast)


# a model's embedding tensor (see `fast_decode.packed_weight`) → its training kernels
_KERNELS: ByTensor[_BaseKernels] = ByTensor()


def base_kernels(fast: FastGemma3) -> _BaseKernels:
    """The frozen weights `fast` reads, for training: built on first use (the backward's Wᵀ
    copies) and kept while the weights live."""
    return _KERNELS.get(fast.embed, lambda: _BaseKernels(fast))


def lora_shapes(fast: FastGemma3) -> dict[str, tuple[int, int]]:
    """Each projection a LoRA may target: module path → (in, out) features, in the order of the
    transformers model's modules (a layer's attention, then its MLP), as `lora.lora_layers`
    wants them."""
    return {
        path: (fast.in_features[proj], fast.out_features[proj])
        for path, (_, proj) in fast.lora_targets.items()
    }


def prepare_training(
    config: Any, tensors: Mapping[str, torch.Tensor], cache: KernelCache | None = None
) -> None:
    """Build now what the first `train()` on this model would (a worker does it when it
    preloads), the head's matmul copy included where a batch with many label rows reads it;
    nothing for a model that trains through the transformers modules."""
    if FastGemma3.supports(config):
        head = base_kernels(training_forward(config, tensors, cache)).head
        if not head.fuses_any_rows:
            head.frozen  # noqa: B018


def training_forward(
    config: Any, tensors: Mapping[str, torch.Tensor], cache: KernelCache | None = None
) -> FastGemma3:
    """The base model's forward as training reads it: its projections on the native kernels where
    they narrow fp32 weights (`FastGemma3`, their panels read from `cache` where a server saved
    them), no head packed for greedy decoding."""
    return FastGemma3(config, tensors, head_scan=False, cache=cache)


class TrainingHead:
    """The vocab head as the loss reads it: by the native fused kernel (`head_loss.c`: each row's
    loss and gradient in one read of the weights) where it runs: an fp32 model's batch with few
    label rows, or a bf16 model's batch of any rows where the CPU has AMX tiles; else as a
    `FrozenWeight` (two matmuls, the backward's on a copy of Wᵀ: 671 MB for Gemma 3 270M in
    fp32), built on first use or by `prepare_training`."""

    # The most label rows the fused kernel takes: below this it beats the two matmuls (weights
    # read once, not twice, and the gradient only over the terms that matter), above it their
    # oneDNN kernels' higher FLOP rate for the logits wins. Same-run, on Gemma 3 270M's 262k x 640
    # head and its hidden states over English text, 2 AVX2 cores, fused / matmuls: 12 rows
    # 102 / 149 ms, 24 194 / 229, 32 256 / 262, 48 345 / 374, 64 341-385 / 405-423, 80 577 / 556,
    # 128 820 / 753. Where few terms are filtered out (a flat softmax), the kernel's gradient
    # costs more and the crossover is nearer 24-32 rows (before the filter: 24 219 / 228, 32 320
    # / 300); a tuned head's softmax is peaked.
    FUSED_MAX_ROWS = 64

    def __init__(self, fast: FastGemma3) -> None:
        self._fast = fast
        # A bf16 model's head only by AMX tiles: its two oneDNN matmuls each read the bf16 head
        # about as fast as the tiles' one pass does, and the kernel's fp32 multiply-adds are 2-3x
        # slower than either. The seed run's 20 heads on an AMX Xeon (2 cores, bf16), same run:
        # 346 ms by the tiles, 600 ms by the matmuls (steps with a flat softmax, whose gradient
        # keeps most terms, about even: 34 / 31 ms at 12 rows; peaked ones 13-16 / 27-39 ms).
        native = fast.native
        fp32 = fast.dtype == torch.float32
        tiles = native.head_loss_tile_rows if native is not None and not fp32 else 0
        self._native = native if (fp32 or tiles) and not fast.softcap else None
        # By tiles, any rows in chunks of the kernel's most (one read of W a chunk): 1.6-2.5x the
        # matmuls at 64-560 rows of the seed run's states, whose two matmuls do not gain as
        # the rows grow (64 rows 101 / 43-53 ms, 128 171 / 59-69, 400 248 / 153, 560 350 / 195).
        self._max_rows = self.FUSED_MAX_ROWS if fp32 else (sys.maxsize if tiles else 0)
        self._chunk_rows = self.FUSED_MAX_ROWS if fp32 else tiles
        self.kernels = fast.native  # a chunk's softmax (`_softmax_xent`)
        self._frozen: FrozenWeight | None = None
        self._lock = threading.Lock()

    @property
    def frozen(self) -> FrozenWeight:
        """The matmul copy, built once (a preload and a job's step may both want it first)."""
        with self._lock:
            if self._frozen is None:
                self._frozen = FrozenWeight(self._fast.head)
            return self._frozen

    @property
    def has_matmul_copy(self) -> bool:
        return self._frozen is not None

    @property
    def fuses_any_rows(self) -> bool:
        """Whether the fused kernel takes every batch, so the matmul copy is never built."""
        return self._max_rows == sys.maxsize

    def fused(
        self, hidden: torch.Tensor, labels: torch.Tensor, grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(sum of the rows' losses, each row's gradient in `hidden`'s dtype or None) by the
        fused kernel, chunk by chunk of rows; None where it does not run (no kernels, a bf16 model
        on a CPU without AMX, a softcapped head, the shapes, more than `_max_rows` rows)."""
        n = labels.shape[0]
        if self._native is None or n > self._max_rows:
            return None
        weight, rows = self._fast.head_weight, self._chunk_rows
        losses, grads = [], []
        for lo in range(0, n, rows):
            x = hidden[lo : lo + rows].float()
            out = self._native.head_loss(x, weight, labels[lo : lo + rows], grad, GRAD_SKIPPED_MASS)
            if out is None:
                return None
            losses.append(out[0].sum())
            grads.append(out[1])
        if not grad:
            return sum(losses[1:], losses[0]), None
        return sum(losses[1:], losses[0]), torch.cat(grads).to(hidden.dtype)  # type: ignore[arg-type]


# The most probability the fused head's gradient may leave out (softmax terms below this / V,
# `head_loss.c`): bf16's rounding, so its error (in units of the largest head row's norm) is
# what a bf16 gradient would carry anyway. On Gemma 3 270M's seed steps it keeps ~15-35% of the
# terms, and the gradient's share of the kernel's time falls from about half to a fifth.
GRAD_SKIPPED_MASS = 2.0**-8

# Label rows per pass of the output head: enough rows that each pass over its 262k×C weight is
# compute-bound, few enough that the (rows × 262k) fp32 logits stay cache-sized.
HEAD_CHUNK_ROWS = 256


def _softmax_xent(
    logits: torch.Tensor, labels: torch.Tensor, softcap: float, kernels: NativeKernels | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy of the rows against their labels, d loss / d logits in the logits'
    dtype) for logits (N, V), softcapped first when `softcap` is set. By the kernels in place
    (`softmax_xent`: 2x torch's softmax over 256 bf16 rows of Gemma's 262k vocab, AMX CPU; loss
    from the fp32 logsumexp), else torch's ops."""
    if not softcap and kernels is not None:
        losses = kernels.softmax_xent(logits, labels)
        if losses is not None:
            return losses.sum(), logits
    rows = torch.arange(labels.shape[0], device=logits.device)
    if softcap:
        capped = torch.tanh(logits.float().div_(softcap))
        logits = capped * softcap
    # Softmax in the activation dtype (accumulated in fp32 inside): 4x faster than an fp32 one
    # plus the cast for the matmul on a CPU. The label's probability then has bf16's 3 digits,
    # so each token's loss is within ~0.004 of the fp32 value.
    grad = torch.softmax(logits, dim=-1)
    picked = grad[rows, labels].float().clamp_min(torch.finfo(torch.float32).tiny)
    grad[rows, labels] -= 1.0
    if softcap:
        grad.mul_((1.0 - capped * capped).to(grad.dtype))
    return -picked.log().sum(), grad


class _HeadLossFn(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ Eᵀ` against labels; logits only for these rows.

    The forward also computes the input gradient: by the head's fused kernel for few rows
    (`TrainingHead.fused`), else chunk by chunk of rows, so no (N × 262k) logits or gradient
    tensor is ever whole: each chunk's logits become its softmax gradient in place and go
    straight through Eᵀ. The backward only scales it.
    """

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, head: TrainingHead, labels: torch.Tensor, softcap: float
    ) -> torch.Tensor:
        n = labels.shape[0]
        want_grad = ctx.needs_input_grad[0]
        fused = head.fused(hidden, labels, want_grad)
        if fused is not None:
            total, grad_hidden = fused
            ctx.save_for_backward(grad_hidden.div_(n) if grad_hidden is not None else None)
            return total / n
        frozen = head.frozen
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for lo in range(0, n, HEAD_CHUNK_ROWS):
            hi = min(n, lo + HEAD_CHUNK_ROWS)
            logits = frozen.forward(hidden[lo:hi])  # (n_c, V) in the activation dtype
            # d loss / d logits = softmax - onehot, in the activation dtype (in place where the
            # kernels do it); the 1/N is applied after Eᵀ (C ≪ V)
            chunk_loss, grad = _softmax_xent(logits, labels[lo:hi], softcap, head.kernels)
            total += chunk_loss
            if grad_hidden is not None:
                grad_hidden[lo:hi] = frozen.backward(grad).div_(n)
        ctx.save_for_backward(grad_hidden)
        return total / n

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * g.to(grad_hidden.dtype), None, None, None


_FUSED_RMS = hasattr(torch.ops.aten, "_fused_rms_norm")


# What a norm's backward reads: x, 1/rms, the weight, and the kernels that normed x (or None)
_NormSaved = tuple[torch.Tensor, torch.Tensor, torch.Tensor, NativeKernels | None]


def _norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, kernels: NativeKernels | None
) -> tuple[torch.Tensor, _NormSaved]:
    """Gemma's RMSNorm, `x / rms(x) * (1 + w)` in fp32, cast back; frozen w (any shape that
    broadcasts over x): one native call where the kernels take x (`rows.c`), else torch's ops.
    A seed step has 91 norms, whose torch ops cost ~180 µs a norm at its ~40 rows (a warm seed
    `train()` of a bf16 model: 4.96 s native, 5.85 s torch, medians of 12 alternating runs)."""
    native = kernels.rms_norm_train(x, weight, eps) if kernels is not None else None
    if native is not None:
        y, rstd = native
        return y, (x, rstd, weight, kernels)
    xf = x.float()
    if _FUSED_RMS:  # x * rsqrt(mean(x²) + eps) in one call (fewer dispatches), same bits
        y, rstd = torch.ops.aten._fused_rms_norm(xf, [x.shape[-1]], None, eps)
    else:
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))
        y = xf * rstd
    return y.mul_(weight).to(x.dtype), (x, rstd, weight, None)


def _norm_backward(saved: _NormSaved, g: torch.Tensor) -> torch.Tensor:
    """x's gradient from the output's g, by what normed x."""
    x, rstd, weight, kernels = saved
    if kernels is not None:
        return kernels.rms_norm_backward(x, g, weight, rstd)
    xhat = x.float() * rstd  # new tensors: in fp32, .float() is the saved tensor itself
    gw = g.float() * weight
    dot = (gw * xhat).mean(-1, keepdim=True)
    return gw.sub_(xhat.mul_(dot)).mul_(rstd).to(x.dtype)


class _RmsNormFn(torch.autograd.Function):
    """`_norm_forward` as one autograd node instead of the eight the plain ops leave."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float,
        kernels: NativeKernels | None,
    ) -> torch.Tensor:  # fmt: skip
        y, (x, rstd, weight, kernels) = _norm_forward(x, weight, eps, kernels)
        ctx.kernels = kernels
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, rstd, weight = ctx.saved_tensors
        return _norm_backward((x, rstd, weight, ctx.kernels), g), None, None, None


def _norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, kernels: NativeKernels | None = None
) -> torch.Tensor:
    y: torch.Tensor = _RmsNormFn.apply(x, weight, eps, kernels)  # type: ignore[no-untyped-call]
    return y


class _AddNormFn(torch.autograd.Function):
    """A residual step and the next norm, `s = x + norm(y, w_out)` and `h = norm(s, w_next)`, as
    one autograd node instead of three (36 of these a seed step; a node costs ~7 µs here, so the
    seed `train()` 2.562 -> 2.541 s), and with the kernels one call each way (`rows.c`). The same
    arithmetic, so the same bits: s's gradient is the sum of what its users send (the next
    residual add, and h's norm here), which autograd would add alike."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, y: torch.Tensor, w_out: torch.Tensor, w_next: torch.Tensor,
        eps: float, kernels: NativeKernels | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        fused = kernels.add_norm_train(x, y, w_out, w_next, eps) if kernels is not None else None
        if fused is not None:  # one pass a row (`rows.c`)
            s, h, rstd_y, rstd_s = fused
        else:
            n, (y, rstd_y, w_out, _) = _norm_forward(y, w_out, eps, kernels)
            s = x + n
            h, (s, rstd_s, w_next, _) = _norm_forward(s, w_next, eps, kernels)
        ctx.kernels, ctx.fused = kernels, fused is not None
        ctx.save_for_backward(y, rstd_y, w_out, s, rstd_s, w_next)
        return s, h

    @staticmethod
    def backward(
        ctx: Any, g_s: torch.Tensor | None, g_h: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        y, rstd_y, w_out, s, rstd_s, w_next = ctx.saved_tensors
        if ctx.fused and g_s is not None and g_h is not None:
            g, g_y = ctx.kernels.add_norm_backward(
                y, s, (w_out, w_next), (rstd_y, rstd_s), g_s, g_h
            )
            return g, g_y, None, None, None, None
        g = g_s
        if g_h is not None:
            from_h = _norm_backward((s, rstd_s, w_next, ctx.kernels), g_h)
            g = from_h if g is None else g + from_h
        if g is None:
            return None, None, None, None, None, None
        return g, _norm_backward((y, rstd_y, w_out, ctx.kernels), g), None, None, None, None


class _QkvHeadsFn(torch.autograd.Function):
    """A layer's fused qkv output (T, (H + 2·Hkv)·D) → q (H, T, D), k and v (Hkv, T, D), each
    contiguous: the q and k heads RMS-normed (each kind with its own weight) and rotated, as
    `_norm` and `_rope` do them. One autograd node whose backward writes the qkv gradient whole,
    where slicing qkv apart left a zero-filled qkv-sized gradient per slice, summed, and the
    rotation's half-dozen ops each a node. With the kernels, each way is one call
    (`rows.c`: the rotation in fp32 and rounded once, where torch rounds each op; seed `train()`
    1.99 -> 1.92 s, medians of 5 alternating runs)."""

    @staticmethod
    def forward(
        ctx: Any, qkv: torch.Tensor, heads: tuple[int, int, int], weight: torch.Tensor,
        eps: float, rope: tuple[torch.Tensor, torch.Tensor], kernels: NativeKernels | None,
        native: _QkNative | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """`native`: the q and k norms' weights, the rotary tables and the tokens' positions,
        for the kernels' one pass each way (`qk_norm_rope(training=True)`), where they take
        them."""
        nh, nkv, hd = heads
        t = qkv.shape[0]
        v = qkv[:, (nh + nkv) * hd :].view(t, nkv, hd).transpose(0, 1).contiguous()
        if kernels is not None and native is not None and kernels.takes_qk(qkv, *native):
            q, k, rstd = kernels.qk_norm_rope(
                qkv, (nh, nkv), native[0], eps, native[1], native[2], training=True
            )
            ctx.heads, ctx.native, ctx.kernels = heads, native, kernels
            ctx.save_for_backward(qkv, rstd)
            return q, k, v
        ctx.native = None
        cos, sin = rope
        qk = qkv[:, : (nh + nkv) * hd].view(t, nh + nkv, hd)
        normed, saved = _norm_forward(qk, weight, eps, kernels)
        rotated = _rope(normed, cos, sin)
        q = rotated[:, :nh].transpose(0, 1).contiguous()
        k = rotated[:, nh:].transpose(0, 1).contiguous()
        ctx.heads, ctx.rope, ctx.norm = heads, rope, saved
        return q, k, v

    @staticmethod
    def backward(
        ctx: Any, gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        nh, nkv, hd = ctx.heads
        t = gq.shape[1]
        grad = torch.empty(t, (nh + 2 * nkv) * hd, dtype=gq.dtype, device=gq.device)
        if ctx.native is not None:
            qkv, rstd = ctx.saved_tensors
            weights, tables, positions = ctx.native
            ctx.kernels.qk_heads_backward(
                qkv, (nh, nkv), weights, rstd, tables, positions, gq, gk, grad
            )
            grad[:, (nh + nkv) * hd :].view(t, nkv, hd).copy_(gv.transpose(0, 1))
            return grad, None, None, None, None, None, None
        cos, sin = ctx.rope
        g_rot = torch.cat((gq.transpose(0, 1), gk.transpose(0, 1)), dim=1)  # (T, H + Hkv, D)
        # the rotation's transpose: x·cos + rot(x)·sin with rot(x) = (-x₂, x₁)
        half = hd // 2
        g_sin = g_rot * sin
        g_normed = g_rot * cos + torch.cat((g_sin[..., half:], -g_sin[..., :half]), dim=-1)
        g_qk = _norm_backward(ctx.norm, g_normed)
        grad[:, : (nh + nkv) * hd].view(t, nh + nkv, hd).copy_(g_qk)
        grad[:, (nh + nkv) * hd :].view(t, nkv, hd).copy_(gv.transpose(0, 1))
        ctx.norm = None
        return grad, None, None, None, None, None, None


# What the kernels read for a layer's q and k heads: the q and k norms' weights (fp32, (D,)),
# the rotary (cos, sin) tables (positions, D) and the packed tokens' positions (T,) int64.
_QkNative = tuple[
    tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], torch.Tensor
]


class _GeluTimesFn(torch.autograd.Function):
    """`_gelu_times` of the fused gate/up output by the kernels (`gelu.c`): one pass forward and
    one backward, where torch's ops take five and a zero-filled gradient for the chunks; each
    value rounded once (3.5-6x torch's ops at 46-800 rows, AMX CPU)."""

    @staticmethod
    def forward(ctx: Any, gu: torch.Tensor, kernels: NativeKernels) -> torch.Tensor:
        out = kernels.gelu_times(gu)
        assert out is not None  # `_mlp_activation` checked that it takes gu
        ctx.kernels = kernels
        ctx.save_for_backward(gu)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (gu,) = ctx.saved_tensors
        return ctx.kernels.gelu_times_backward(gu, g), None


def _mlp_activation(gu: torch.Tensor, kernels: NativeKernels | None) -> torch.Tensor:
    """gelu-tanh(gate) · up of gu (..., 2F): by the kernels where they take it, else torch's."""
    flat = gu.reshape(-1, gu.shape[-1])
    if kernels is not None and kernels.takes_gate_up(flat):
        out: torch.Tensor = _GeluTimesFn.apply(flat, kernels)  # type: ignore[no-untyped-call]
        return out.view(*gu.shape[:-1], -1)
    return _gelu_times(gu)


def _row_multiple(tokens: int) -> int:
    """The multiple a step's packed row is padded to (`data.padded`). oneDNN builds its matmul
    kernels for each row count it meets, 5-17 ms a shape the first time on an AMX Xeon (Gemma 3
    270M's projections at 700-760 rows; 0.8-1.7 ms a call after), and a step's 8 shapes
    (forward and backward of 4 groups) each meet a new count at nearly every step of packed
    examples of mixed lengths. Padded, the counts repeat: 16 values up to 128 rows (a few
    filler rows of a seed-sized step), then 64 (at most 8% more rows from 768 on)."""
    return 16 if tokens <= 128 else 64


# Up to this many packed tokens, attention is one masked matmul over the whole row; beyond, one
# causal attention per example (a dense mask would cost O(T²) for mostly masked-out pairs).
DENSE_ATTENTION_MAX_TOKENS = 256
# A step of at most this many tokens computes its LoRA products in fp32: at these sizes (K or N
# of 16-32) MKL's fp32 products take 9-26 µs where oneDNN's bf16 ones take 22-37 µs (a seed step:
# 40-70 tokens); from ~128 rows on, the bf16 ones on AMX are faster.
LORA_FP32_MAX_ROWS = 128


def _mask(
    n: int, window: int | None, groups: int, device: torch.device,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Additive mask (groups·n, n) over n tokens: 0 where a token may attend (not ahead, inside
    `window` when given, in the same example when `segments` are given), -inf elsewhere;
    repeated for the query heads that share a KV head."""
    pos = torch.arange(n, device=device)
    offset = pos[:, None] - pos[None, :]
    allowed = offset >= 0
    if window is not None:
        allowed &= offset < window
    if segments is not None:
        allowed &= segments[:, None] == segments[None, :]
    mask = torch.zeros((n, n), device=device).masked_fill_(~allowed, -torch.inf)
    return mask.repeat(groups, 1)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q (H, T, D), k/v (Hkv, T, D), additive mask (H/Hkv·T, T) → (T, H·D).

    Plain matmuls, the scores masked and softmaxed in fp32, as transformers' eager attention
    does it: q·kᵀ in the activation dtype (oneDNN accumulates a bf16 matmul in fp32, then rounds
    each score once), then scaled in fp32. On a CPU the fused (flash) kernel is no faster than
    this at these sizes, forward and backward; q·kᵀ in fp32 was 2x slower at 400 tokens (AMX).
    """
    h, t, d = q.shape
    qg = q.reshape(k.shape[0], -1, d)  # the heads sharing one KV head, stacked along rows
    if q.dtype == torch.float32:
        scores = torch.baddbmm(mask, qg, k.transpose(1, 2), alpha=scale)
    else:
        scores = torch.bmm(qg, k.transpose(1, 2)).float().mul_(scale).add_(mask)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return (probs @ v).view(h, t, d).transpose(0, 1).reshape(t, h * d)


class _AttentionFn(torch.autograd.Function):
    """A packed step's attention by the kernels (`train_attention.c`), one call each way: the
    mask's rule (causal, in `window`, in the token's example) applied as it goes, where `_attend`
    takes a dozen ops and autograd nodes each way (Gemma 3 270M's layer at 45 tokens, bf16:
    364 -> 146 µs forward and backward)."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor,
        window: int | None, scale: float, kernels: NativeKernels,
    ) -> torch.Tensor:  # fmt: skip
        out, p = kernels.train_attention(q, k, v, segments, window, scale)
        ctx.window, ctx.scale, ctx.kernels = window, scale, kernels
        ctx.save_for_backward(q, k, v, segments, p)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, segments, p = ctx.saved_tensors
        dq, dk, dv = ctx.kernels.train_attention_backward(
            q, k, v, segments, ctx.window, ctx.scale, p, g
        )
        return dq, dk, dv, None, None, None, None


class _TilesAttentionFn(torch.autograd.Function):
    """A packed step's attention by AMX tiles (`attention_tiles.c`), one call each way, for any
    number of tokens: each example's queries meet its own keys only, and the backward makes the
    softmax weights again from each row's log-sum-exp instead of keeping them. Where
    `_attend` ran per example above `DENSE_ATTENTION_MAX_TOKENS` (the throughput bench's steps
    of ~760 tokens, 4 examples, bf16, AMX), 242 of a step's 984 ms went to attention."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor,
        window: int | None, scale: float, kernels: NativeKernels,
    ) -> torch.Tensor:  # fmt: skip
        done = kernels.tiles_attention(q, k, v, starts, window, scale)
        if done is None:
            raise MemoryError("no memory for the attention's buffers")
        out, lse = done
        ctx.window, ctx.scale, ctx.kernels = window, scale, kernels
        ctx.save_for_backward(q, k, v, starts, lse)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, starts, lse = ctx.saved_tensors
        dq, dk, dv = ctx.kernels.tiles_attention_backward(
            q, k, v, starts, ctx.window, ctx.scale, lse, g
        )
        return dq, dk, dv, None, None, None, None


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch,
    window: int | None, scale: float, mask: torch.Tensor | None,
    kernels: NativeKernels | None = None, starts: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """q (H, T, D), k/v (Hkv, T, D) → (T, H·D): attention within each example, causal, and
    within `window` positions when given. By AMX tiles where given the examples' `starts` (the
    caller checked that the kernels take q, k and v); else `mask` (a `_mask` over the whole
    row) selects one pass over it, by the kernels where they take it; without it each example
    attends on its own."""
    if starts is not None and kernels is not None:
        tiles: torch.Tensor = _TilesAttentionFn.apply(q, k, v, starts, window, scale, kernels)  # type: ignore[no-untyped-call]
        return tiles
    if mask is not None:
        if kernels is not None and kernels.takes_attention(q, k, v):
            out: torch.Tensor = _AttentionFn.apply(q, k, v, batch.segments, window, scale, kernels)  # type: ignore[no-untyped-call]
            return out
        return _attend(q, k, v, mask, scale)
    groups = q.shape[0] // k.shape[0]
    masks: dict[int, torch.Tensor] = {}
    outs = []
    for start, end in batch.bounds:
        n = end - start
        if n not in masks:
            masks[n] = _mask(n, window, groups, q.device)
        outs.append(_attend(q[:, start:end], k[:, start:end], v[:, start:end], masks[n], scale))
    return torch.cat(outs)


class FastGemma3Train:
    """Loss of a packed batch through a Gemma 3 model with `layers` (LoRA) injected."""

    def __init__(self, spec: FastGemma3, layers: dict[str, LoraLinear]) -> None:
        """`spec`: the base model's forward (config, norms, rotary tables; its weights are the
        frozen ones trained around); `layers`: the LoRA layers, by module path."""
        self.spec = spec
        kernels = base_kernels(spec)
        by_target = {self.spec.lora_targets[path]: layer for path, layer in layers.items()}
        self.groups: list[dict[str, _Group]] = []
        for i, frozen in enumerate(kernels.groups):
            groups = {}
            for group, members in GROUPS:
                loras = [by_target.get((i, m)) for m in members]
                present = [lora for lora in loras if lora is not None]
                if present and len(present) != len(members):
                    # a partial group: unfused members would need their own weights
                    raise ValueError("LoRA must target all or none of " + "/".join(members))
                params = [p for lora in present for p in (lora.lora_A, lora.lora_B)]
                scaling = present[0].scaling if present else 1.0
                blocks, lo, r_lo = [], 0, 0
                for lora in present:
                    hi, r_hi = lo + lora.lora_B.shape[0], r_lo + lora.lora_B.shape[1]
                    blocks.append((lo, hi, r_lo, r_hi))
                    lo, r_lo = hi, r_hi
                groups[group] = _Group(frozen[group], params, scaling, blocks, spec.native)
            self.groups.append(groups)
        nh, nkv = self.spec.n_heads, self.spec.n_kv
        self._qk_norms = [
            torch.cat([layer.q_norm.expand(nh, -1), layer.k_norm.expand(nkv, -1)])
            for layer in self.spec.layers
        ]  # (H + Hkv, D): the q heads' norm weight, then the k heads'
        self.head = kernels.head
        self.softcap = float(self.spec.softcap or 0.0)
        # the filler rows' token (`_row_multiple`): the model's padding token, else token 0
        self.pad_id = int(getattr(self.spec.config, "pad_token_id", None) or 0)
        # each group's As first (stacked: one view), then its Bs
        self._flat = _FlatParams(
            [p for groups in self.groups for g in groups.values() for p in g.params[0::2]]
            + [p for groups in self.groups for g in groups.values() for p in g.params[1::2]]
        )

    @staticmethod
    def fits(config: Any, lora: LoraSpec) -> bool:
        """Whether a LoRA of `lora` on a model of `config` trains here: a Gemma 3 the forward
        supports, whole fused groups targeted, no dropout (the groups have none on their input)."""
        return (
            FastGemma3.supports(config)
            and FastGemma3Train.targets_fit(lora.target_modules)
            and not lora.dropout
        )

    @staticmethod
    def targets_fit(target_modules: Sequence[str]) -> bool:
        """Whether a LoRA over `target_modules` covers whole fused groups."""
        wanted = set(target_modules)
        return (
            bool(wanted)
            and all(set(members) <= wanted or not (set(members) & wanted) for _, members in GROUPS)
            and wanted <= set(PROJECTIONS)
        )

    def loss(self, batch: PackedBatch) -> torch.Tensor:
        f = self.spec
        batch = padded(batch, _row_multiple(batch.input_ids.shape[0]), self.pad_id)
        t = batch.input_ids.shape[0]
        f._ensure_rope(int(batch.positions.max()) + 1)
        rope = {
            kind: (c[batch.positions].unsqueeze(1), s[batch.positions].unsqueeze(1))
            for kind, (c, s) in f._rope.items()
        }  # (T, 1, D): one table for every head
        # detached: the weights may be a model's parameters that still want gradients
        x = F.embedding(batch.input_ids, f.embed.detach()) * f.embed_scale  # (T, C)
        # a few rows: the LoRA products in fp32 on the master weights (no cast): see below
        cast = self._flat.cast(torch.float32 if t <= LORA_FP32_MAX_ROWS else x.dtype)
        native = f.native
        hd, nh, nkv = f.head_dim, f.n_heads, f.n_kv
        masks: dict[bool, torch.Tensor] = {}  # by sliding: a dense pass's mask, made once
        starts = torch.tensor([lo for lo, _ in batch.bounds] + [t], dtype=torch.int64)
        h = _norm(x, f.layers[0].ln_in, f.eps, native)
        for i, layer in enumerate(f.layers):
            groups = self.groups[i]
            cos, sin = rope["sliding" if layer.sliding else "full"]
            qkv = groups["qkv"](h, cast)
            kind = "sliding" if layer.sliding else "full"
            qk_native = ((layer.q_norm, layer.k_norm), f._rope[kind], batch.positions)
            q, k, v = _QkvHeadsFn.apply(
                qkv, (nh, nkv, hd), self._qk_norms[i], f.eps, (cos, sin), native, qk_native
            )  # type: ignore[no-untyped-call]
            window = f.window if layer.sliding else None
            tiles = native is not None and native.takes_tiles_attention(q, k, v)
            mask = None
            if not tiles and t <= DENSE_ATTENTION_MAX_TOKENS:
                if layer.sliding not in masks:
                    masks[layer.sliding] = _mask(t, window, nh // nkv, x.device, batch.segments)
                mask = masks[layer.sliding]
            a = _attention(
                q, k, v, batch, window, f.scaling, mask, native, starts if tiles else None
            )
            o = groups["o"](a, cast)
            x, h = _AddNormFn.apply(x, o, layer.ln_post_attn, layer.ln_pre_ff, f.eps, native)  # type: ignore[no-untyped-call]
            m = _mlp_activation(groups["gu"](h, cast), native)
            d = groups["down"](m, cast)
            if i + 1 < len(f.layers):  # the residual, and the next layer's input norm
                ln_next = f.layers[i + 1].ln_in
                x, h = _AddNormFn.apply(x, d, layer.ln_post_ff, ln_next, f.eps, native)  # type: ignore[no-untyped-call]
            else:
                x = x + _norm(d, layer.ln_post_ff, f.eps, native)
        picked = x.index_select(0, batch.label_positions)
        hidden = _norm(picked, f.final_norm, f.eps, native)
        loss: torch.Tensor = _HeadLossFn.apply(hidden, self.head, batch.labels, self.softcap)  # type: ignore[no-untyped-call]
        return loss
