"""Native decode kernels: the C files here compiled once per machine with the system C compiler
(a few seconds) and called through ctypes, each for every row of a decode step in one call.

- `decode_attention.c`: torch's attention runs one op per row and layer when rows have their own
  caches (~40 µs each with the slicing around it: 23 ms of a 32-row step on 2 cores); padding
  the rows into one `scaled_dot_product_attention` would change a row's bits with its
  neighbours' lengths. The kernel does each row alone, in an order fixed by that row's cache.
- `lora_delta.c`: each run of rows with its own adapter, instead of two small matmuls per run,
  group and layer (8 ms of a 32-row step over 8 adapters).
- `rows.c`: RMS norms in one call instead of eight ops, q/k norms with RoPE in one call instead
  of ~16, and the best logit of each row.
- `head.c`: a greedy row's token without the full vocab head (10.7 GFLOP for 32 rows): int8
  scores of every token (by AVX512-VNNI, or AVX2) with a proven error bound each, then the
  exact fp32 logits (for bf16 weights rounded to bf16, as the head's are) of the few whose
  bound reaches the best. It serves fp32 weights too (a CPU without AVX512 decodes in fp32: the
  fp32 head took 127 of a 32-row step's ~275 ms there, ~40 of a 1-row step's ~67 ms).
- `linear.c`: the projections of a model run in fp32 whose weights are bf16 values, reading
  them as bf16 in k-major panels (`FastGemma3`'s `narrow` linears, prompts and steps alike);
  and the `fast-int8` backend's decode steps, int8 weights in the same panels (torch's int8
  kernel reads ~2.5 GB/s on a 2-core AVX2 CPU: a 1-row step's projections took 82 ms).
- `head_loss.c`: training's vocab head for a step with few label rows: each row's cross-entropy
  and its gradient in one read of the weights (an online softmax over blocks of vocab rows),
  where two matmuls read the 671 MB fp32 head twice; for a bf16 head on a CPU with AMX, any
  rows, by tiles (the seed run's 20 heads: 339 ms, the two oneDNN matmuls 649 ms), and its
  softmax / cross-entropy pass over a chunk of logits (`softmax_xent`).
- `tiles.c`: a bf16 model's projections for up to 64 rows (decode steps, prompt blocks, small
  training steps) by AMX tiles from a copy packed for them: 0.78-0.84x oneDNN's time at 1-46
  rows, with its bits up to 32 (`amx.h`: the tiles' permission and configuration).
- `gelu.c`: training's MLP activation gelu-tanh(gate) · up and its gradient, one pass each.

Each kernel but the heads' is built twice from one source (`elem.h`): for bf16 activations and
caches, and (`kernels_f32.c`) for fp32 ones, where a CPU without AVX512-BF16 runs the model. In
fp32 they took a 1-row step with an adapter from 61 to 50 ms on a 2-core AVX2 CPU (torch's ~1,000
small ops between the matmuls were a third of it), and `linear.c` the rest to 21-24 ms.

Where no compiler works (or on a GPU) `NativeKernels.load()` is None and callers keep torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tunery.engine.gguf_blocks import Blocks

log = logging.getLogger(__name__)

Part = tuple[int, int, int, int, torch.Tensor]  # out_lo, out_hi, r_lo, r_hi, B (out_part, r_part)

_HEADERS = [Path(__file__).with_name(n) for n in ("bf16.h", "elem.h", "amx.h", "blocks.h")]
_SOURCES = [
    Path(__file__).with_name(n)
    for n in (
        "decode_attention.c", "lora_delta.c", "rows.c", "head.c", "kernels_f32.c", "linear.c",
        "head_loss.c", "gelu.c", "tiles.c", "lora_train.c", "train_attention.c",
        "attention_tiles.c", "decode_step.c", "head_topk.c", "tiles_gemm.c", "lora_tiles.c",
    )
]  # fmt: skip
# -ffp-contract=off: GCC fuses a * b + c into one FMA (one rounding) where its optimizer sees
# fit, so two loops written alike (a row's LoRA u alone, and 4 rows at a time) could round
# differently; unfused, every sum rounds as written, and a row gets the same bits either way.
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC"]
_FLAGS += [f"-I{Path(__file__).parent}"]


class NativeKernels:
    """The compiled kernels, for bf16 or fp32 CPU activations (and fp32 LoRA weights)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        # names the build (sources, flags, CPU), and so the layouts its packs are in
        self.build = Path(library._name).stem.removeprefix("tunery-kernels-")
        i64, ptr, i32, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        attend_args = [i64, i64, i64, i64, ptr, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, f32, ptr]
        self._attend = _by_dtype(library, "tunery_decode_attention", [*attend_args, i32], i32)
        lora_args = [i64, ptr, ptr, ptr, ptr, i64, ptr, i64, i32]
        self._lora = _by_dtype(library, "tunery_lora_add", lora_args, i32)
        self._lora_fits = _by_dtype(library, "tunery_lora_train_fits", [ptr], i32)
        lora_fwd_args = [i64, ptr, f32, ptr, i64, ptr, i64, ptr, i32]
        self._lora_fwd = _by_dtype(library, "tunery_lora_train_forward", lora_fwd_args, i32)
        attn_args = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, f32, ptr, ptr, i32]
        self._train_attn = _by_dtype(library, "tunery_train_attention", attn_args, None)
        attn_back_args = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, f32, ptr, ptr, ptr]
        attn_back_args += [ptr, ptr, ptr, i32]
        self._train_attn_back = _by_dtype(
            library, "tunery_train_attention_backward", attn_back_args, None
        )
        lora_bwd_args = [i64, ptr, f32, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, i64, i32]
        self._lora_bwd = _by_dtype(library, "tunery_lora_train_backward", lora_bwd_args, i32)
        self._argmax = _by_dtype(library, "tunery_argmax", [i64, i64, ptr, i64, ptr, i32], None)
        rms_args = [i64, i64, i64, ptr, i64, ptr, f32, ptr, i64, i32]
        self._rms = _by_dtype(library, "tunery_rms_norm", rms_args, None)
        rms_train_args = [i64, i64, i64, ptr, i64, ptr, i64, f32, ptr, ptr, i32]
        self._rms_train = _by_dtype(library, "tunery_rms_norm_train", rms_train_args, None)
        rms_back_args = [i64, i64, i64, ptr, i64, ptr, ptr, i64, ptr, ptr, i32]
        self._rms_back = _by_dtype(library, "tunery_rms_norm_backward", rms_back_args, None)
        add_norm_args = [i64, i64, ptr, i64, ptr, i64, ptr, ptr, f32, ptr, ptr, ptr, ptr, i32]
        self._add_norm = _by_dtype(library, "tunery_add_norm_train", add_norm_args, None)
        add_norm_back_args = [i64, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
        self._add_norm_back = _by_dtype(
            library, "tunery_add_norm_backward", [*add_norm_back_args, ptr, i32], None
        )
        qk_args = [i64, i64, i64, i64, ptr, i64, ptr, ptr, f32, ptr, ptr, ptr]
        qk_args += [ptr, i64, i64, ptr, i64, i64, ptr, i32]
        self._qk = _by_dtype(library, "tunery_qk_norm_rope", qk_args, None)
        qk_back_args = [i64, i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr]
        qk_back_args += [ptr, ptr, i64, i64, ptr, i64, i32]
        self._qk_back = _by_dtype(library, "tunery_qk_norm_rope_backward", qk_back_args, None)
        self._gelu = _by_dtype(library, "tunery_gelu_times", [i64, i64, ptr, ptr, i32], None)
        gelu_back_args = [i64, i64, ptr, ptr, ptr, i32]
        self._gelu_back = _by_dtype(library, "tunery_gelu_times_backward", gelu_back_args, None)
        self._linear = library.tunery_linear_bf16w
        self._linear.argtypes = [i64, i64, i64, ptr, i64, ptr, ptr, i64, i32]
        self._linear.restype = i32
        self._linear_i8 = library.tunery_linear_i8w
        self._linear_i8.argtypes = [i64, i64, i64, ptr, i64, ptr, ptr, ptr, i64, i32]
        self._linear_i8.restype = i32
        self._linear_pack_f32 = library.tunery_linear_pack_f32
        self._linear_pack_f32.argtypes = [i64, i64, ptr, i64, i64, ptr, ctypes.c_int]
        self._linear_pack_f32.restype = i64
        self.linear_panel = int(library.tunery_linear_panel())  # outputs per panel
        self._head_ok = bool(library.tunery_head_supported())
        self._head_pack = library.tunery_head_pack
        self._head_pack.argtypes = [i64, i64, ptr, i32, ptr, ptr, ptr, ptr, ptr, i32]
        self._head_pack.restype = None
        self._head_argmax = library.tunery_head_argmax
        self._head_argmax.argtypes = [i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr]
        self._head_argmax.argtypes += [i32, i64, ptr, ptr, i32]
        self._head_argmax.restype = i32
        self.head_topk = bool(library.tunery_head_topk_supported())  # `top_logits` runs here
        self._head_topk = library.tunery_head_topk
        self._head_topk.argtypes = [i64, i64, i64, ptr, i64, ptr, i64, ptr, ptr, i32]
        self._head_topk.restype = i32
        self._head_topk_blocks = library.tunery_head_topk_blocks
        self._head_topk_blocks.argtypes = [i64, i64, i64, ptr, i64, ptr, i64, i64, i64, ptr, ptr]
        self._head_topk_blocks.argtypes += [i32]
        self._head_topk_blocks.restype = i32
        self._head_loss = library.tunery_head_loss
        self._head_loss.argtypes = [i64, i64, i64, ptr, ptr, i32, ptr, ptr, ptr, f32, i32]
        self._head_loss.restype = i32
        self.tiles = bool(library.tunery_tiles_supported())  # `tiles_linear` runs here
        self._tiles_pack = library.tunery_tiles_pack
        self._tiles_pack.argtypes = [i64, i64, ptr, ptr]
        self._tiles_pack.restype = None
        self._tiles_linear = library.tunery_tiles_linear
        self._tiles_linear.argtypes = [i64, i64, i64, ptr, ptr, ptr, i32]
        self._tiles_linear.restype = i32
        self._tiles_gemm = library.tunery_tiles_gemm
        self._tiles_gemm.argtypes = [i64, i64, i64, ptr, ptr, i64, ptr, ptr, ptr, i32]
        self._tiles_gemm.restype = i32
        self._lora_tiles_tn = library.tunery_lora_tiles_tn
        self._lora_tiles_tn.argtypes = [i64, i64, i64, ptr, i64, ptr, i64, f32, i32, ptr, i32]
        self._lora_tiles_tn.restype = i32
        self._qtiles_pack = library.tunery_qtiles_pack
        self._qtiles_pack.argtypes = [i64, i64, ptr, ptr, i64, ptr, ptr]
        self._qtiles_pack.restype = None
        self._qtiles_record = library.tunery_qtiles_record
        self._qtiles_record.argtypes = [i64, i64]
        self._qtiles_record.restype = i64
        self._qtiles_linear = library.tunery_qtiles_linear
        self._qtiles_linear.argtypes = [i64, i64, i64, ptr, ptr, i64, i64, ptr, i32]
        self._qtiles_linear.restype = i32
        self.attention_tiles = bool(library.tunery_tiles_attention_supported())
        tiles_attn_args: list[Any] = [i64, i64, i64, i64, ptr, ptr, ptr, i64, ptr, i64, f32]
        self._tiles_attn = library.tunery_tiles_attention
        self._tiles_attn.argtypes = [*tiles_attn_args, ptr, ptr, i32]
        self._tiles_attn.restype = i32
        self._tiles_attn_back = library.tunery_tiles_attention_backward
        self._tiles_attn_back.argtypes = [*tiles_attn_args, ptr, ptr, ptr, ptr, ptr, i32]
        self._tiles_attn_back.restype = i32
        # the most label rows `head_loss` multiplies a bf16 head by AMX tiles (0: none here)
        self.head_loss_tile_rows = int(library.tunery_head_loss_amx_rows())
        self._step = library.tunery_decode_step
        self._step.argtypes = [ptr, f32, f32, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr]
        self._step.argtypes += [ptr, ptr, i32]
        self._step.restype = i32
        self._gelu_torch = library.tunery_gelu_times_torch
        self._gelu_torch.argtypes = [i64, i64, ptr, ptr, ptr, i32]
        self._gelu_torch.restype = None
        self._gelu_table_of = library.tunery_gelu_table
        self._gelu_table_of.argtypes = [ptr, ptr]
        self._gelu_table_of.restype = None
        tanh = _torch_tanh16() if library.tunery_decode_step_supported() else None
        # the step's gelu of each bf16 gate, by torch's own tanh, where it gives torch's bits
        # (else no step)
        self._gelu_table = self._torchs_gelu_table(tanh) if tanh is not None else None
        self._softmax_xent = library.tunery_softmax_xent
        self._softmax_xent.argtypes = [i64, i64, ptr, i32, ptr, ptr, i32]
        self._softmax_xent.restype = i32

    @staticmethod
    def load() -> NativeKernels | None:
        """The kernels, compiled on first use; None where they cannot be built or loaded."""
        library = _library()
        return None if library is None else NativeKernels(library)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        caches: CacheTable,
        positions: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Write each row's new key and value at its position's slot, then attend.

        q (B, nh, hd) contiguous; k, v (B, nkv·hd) with any row stride; `caches` row r's K and
        V cache (nkv, size_r, hd) contiguous, a ring when `positions[r]` ≥ size_r; `positions`
        (B,) int64; all bf16 or all fp32. Returns (B, nh·hd) in their dtype."""
        rows, nh, hd = q.shape
        for t in (k, v):
            if t.stride(-1) != 1:
                raise ValueError("k and v rows must be contiguous")
        if not caches.k.shape[0] == caches.v.shape[0] == caches.sizes.shape[0] == rows:
            raise ValueError(f"{rows} rows and {caches.k.shape[0]} caches")
        attend = _kernel(self._attend, q, k, v, dtype=caches.dtype)
        out = torch.empty(rows, nh * hd, dtype=q.dtype)
        status = attend(
            rows, nh, caches.kv_heads, hd, q.data_ptr(), k.data_ptr(), k.stride(0), v.data_ptr(),
            v.stride(0), caches.k.data_ptr(), caches.v.data_ptr(), positions.data_ptr(),
            caches.sizes.data_ptr(), scale, out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("decode attention: out of memory")
        return out

    def lora_add(
        self, base: torch.Tensor, x: torch.Tensor, spans: Sequence[tuple[int, int, LoraDesc | None]]
    ) -> torch.Tensor:
        """base (B, out) += each span's LoRA delta of x (B, in) on its rows [lo, hi), in place
        (both bf16 or both fp32); a span whose desc is None adds nothing. Returns `base`."""
        if base.stride(-1) != 1 or x.stride(-1) != 1:
            raise ValueError("base and x rows must be contiguous")
        lora = _kernel(self._lora, base, x)
        n = len(spans)
        lo = (ctypes.c_int64 * n)(*[s[0] for s in spans])
        hi = (ctypes.c_int64 * n)(*[s[1] for s in spans])
        desc = (ctypes.c_void_p * n)(*[None if s[2] is None else s[2].pointer for s in spans])
        status = lora(
            n, lo, hi, desc, x.data_ptr(), x.stride(0), base.data_ptr(), base.stride(0),
            torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("LoRA delta: out of memory")
        return base

    def lora_train_fits(self, desc: LoraDesc, dtype: torch.dtype) -> bool:
        """Whether `lora_train_forward` takes this group for activations of `dtype`."""
        return dtype in _KERNEL_SUFFIXES and bool(self._lora_fits[dtype](desc.pointer))

    def lora_train_forward(
        self, y: torch.Tensor, x: torch.Tensor, desc: LoraDesc, scale: float
    ) -> torch.Tensor:
        """y (N, out) += scale · (x Aᵀ) Bᵀ over each part's columns, in place (fp32 sums
        rounded once); returns u = x Aᵀ (N, R) in fp32. x and y of one dtype, rows contiguous,
        the desc one `lora_train_fits` takes (`lora_train.c`)."""
        if y.stride(-1) != 1 or x.stride(-1) != 1:
            raise ValueError("x and y rows must be contiguous")
        rows = x.shape[0]
        u = torch.empty(rows, desc.rank, dtype=torch.float32)
        status = _kernel(self._lora_fwd, y, x)(
            rows, desc.pointer, scale, x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0),
            u.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("LoRA forward: out of memory")
        return u

    def lora_train_backward(
        self, g: torch.Tensor, x: torch.Tensor, u: torch.Tensor, desc: LoraDesc, scale: float,
        gx: torch.Tensor | None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
        """The backward of `lora_train_forward` for the output's gradient g (N, out): the
        gradient of A (R, in) and of each part's B, fp32; with `gx` (N, in, x's dtype) also adds
        the input's gradient through the LoRA into it, in place (rounded once)."""
        for t in (g, x) if gx is None else (g, x, gx):
            if t.stride(-1) != 1:
                raise ValueError("g, x and gx rows must be contiguous")
        rows, r = u.shape
        grad_a = torch.empty(r, desc.in_features, dtype=torch.float32)
        grad_b = torch.empty(sum(desc.part_sizes), dtype=torch.float32)
        tensors = (g, x) if gx is None else (g, x, gx)
        status = _kernel(self._lora_bwd, *tensors)(
            rows, desc.pointer, scale, x.data_ptr(), x.stride(0), g.data_ptr(), g.stride(0),
            u.contiguous().data_ptr(), grad_a.data_ptr(), grad_b.data_ptr(),
            None if gx is None else gx.data_ptr(), 0 if gx is None else gx.stride(0),
            torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("LoRA backward: out of memory")
        grad_bs, start = [], 0
        for (rows_b, cols_b), size in zip(desc.part_shapes, desc.part_sizes, strict=True):
            grad_bs.append(grad_b[start : start + size].view(rows_b, cols_b))
            start += size
        return grad_a, grad_bs

    @staticmethod
    def takes_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether `train_attention` takes these: contiguous CPU (H, T, D), (Hkv, T, D) of one
        dtype, H a multiple of Hkv and D of the vector width (16 values covers any build)."""
        same = q.dtype == k.dtype == v.dtype and q.dtype in _KERNEL_SUFFIXES
        shapes = q.dim() == 3 and k.shape == v.shape and k.shape[1:] == q.shape[1:]
        return (
            same and shapes and q.device.type == "cpu"
            and all(t.is_contiguous() for t in (q, k, v))
            and q.shape[0] % k.shape[0] == 0 and q.shape[2] % 16 == 0
        )  # fmt: skip

    def takes_tiles_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether `tiles_attention` takes these: AMX tiles here, bf16 q, k and v as
        `takes_attention` says, D a multiple of 32."""
        return (
            self.attention_tiles and q.dtype == torch.bfloat16
            and self.takes_attention(q, k, v) and q.shape[2] % 32 == 0
        )  # fmt: skip

    def tiles_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor,
        window: int | None, scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
        """A packed step's causal attention by AMX tiles (`attention_tiles.c`), q (H, T, D), k and
        v (Hkv, T, D) as `takes_tiles_attention` says, each token within `window` tokens back in
        its own example (`starts`: (n + 1,) int64 offsets, 0 first and T last) → (out (T, H·D),
        each row's log-sum-exp (H, T) fp32 for `tiles_attention_backward`); None where the
        kernel cannot (no memory for its buffers, bounds that do not cover T)."""
        h, t, d = q.shape
        out = torch.empty(t, h * d, dtype=q.dtype)
        lse = torch.empty(h, t, dtype=torch.float32)
        status = self._tiles_attn(
            h, k.shape[0], t, d, q.data_ptr(), k.data_ptr(), v.data_ptr(), starts.numel() - 1,
            starts.data_ptr(), window or 0, scale, out.data_ptr(), lse.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        return (out, lse) if status == 0 else None

    def tiles_attention_backward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor,
        window: int | None, scale: float, lse: torch.Tensor, grad_out: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """The gradients of q, k and v from the output's (T, H·D) (`tiles_attention`'s arguments
        and log-sum-exps)."""
        h, t, d = q.shape
        go = grad_out.to(q.dtype).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        status = self._tiles_attn_back(
            h, k.shape[0], t, d, q.data_ptr(), k.data_ptr(), v.data_ptr(), starts.numel() - 1,
            starts.data_ptr(), window or 0, scale, lse.data_ptr(), go.data_ptr(), dq.data_ptr(),
            dk.data_ptr(), dv.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("no memory for the attention backward's buffers")
        return dq, dk, dv

    def train_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor | None,
        window: int | None, scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """A packed step's causal attention (`train_attention.c`): q (H, T, D), k and v (Hkv,
        T, D) as `takes_attention` says, each token within `window` tokens back and its own
        example (`segments` (T,) int64, or None: one) → (out (T, H·D), the softmax weights
        (H, T, T) fp32 for `train_attention_backward`)."""
        h, t, d = q.shape
        out = torch.empty(t, h * d, dtype=q.dtype)
        p = torch.empty(h, t, t, dtype=torch.float32)
        seg = None if segments is None else segments.to(torch.int64).contiguous()
        _kernel(self._train_attn, q, k, v)(
            h, k.shape[0], t, d, q.data_ptr(), k.data_ptr(), v.data_ptr(),
            None if seg is None else seg.data_ptr(), window or 0, scale, out.data_ptr(),
            p.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out, p

    def train_attention_backward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor | None,
        window: int | None, scale: float, p: torch.Tensor, grad_out: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """The gradients of q, k and v from the output's (T, H·D) (`train_attention`'s
        arguments and weights)."""
        h, t, d = q.shape
        go = grad_out.to(q.dtype).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        ds = torch.empty(h, t, t, dtype=torch.float32)
        seg = None if segments is None else segments.to(torch.int64).contiguous()
        _kernel(self._train_attn_back, q, k, v, go)(
            h, k.shape[0], t, d, q.data_ptr(), k.data_ptr(), v.data_ptr(),
            None if seg is None else seg.data_ptr(), window or 0, scale, p.data_ptr(),
            go.data_ptr(), ds.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        return dq, dk, dv

    def argmax(self, logits: torch.Tensor) -> list[int]:
        """(B, V) bf16 or fp32 → each row's index of its largest value, the first of equal
        ones."""
        if logits.stride(-1) != 1:
            raise ValueError("contiguous rows")
        argmax = _kernel(self._argmax, logits)
        rows, n = logits.shape
        out = torch.empty(rows, dtype=torch.int64)
        argmax(
            rows, n, logits.data_ptr(), logits.stride(0), out.data_ptr(), torch.get_num_threads()
        )
        return out.tolist()

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int = 1
    ) -> torch.Tensor:
        """(B, heads·n) bf16 or fp32 → each head's n values / sqrt(mean square + eps) · weight
        (n,) fp32, as a new (B, heads·n) tensor of x's dtype."""
        rows, width = x.shape
        if x.stride(-1) != 1 or weight.dtype != torch.float32 or not weight.is_contiguous():
            raise ValueError("contiguous rows and an fp32 weight")
        rms = _kernel(self._rms, x)
        out = torch.empty(rows, width, dtype=x.dtype)
        n = width // heads
        rms(
            rows, heads, n, x.data_ptr(), x.stride(0), weight.data_ptr(), eps, out.data_ptr(),
            width, torch.get_num_threads(),
        )  # fmt: skip
        return out

    def rms_norm_train(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Training's RMS norm of x (..., n) or (rows, heads, n) bf16 or fp32 over its last dim,
        times `weight` fp32: (n,) for every head or (heads, n), each head its own → (the normed
        values, a new contiguous tensor of x's shape and dtype; 1 / rms per row and head, fp32,
        for `rms_norm_backward`). None where x's layout is not rows of contiguous heads."""
        rows, heads, n, stride = _rows_of_heads(x)
        if rows is None or not _norm_weight(weight, heads, n):
            return None
        out = torch.empty(x.shape, dtype=x.dtype)
        rstd = torch.empty(rows, heads, dtype=torch.float32)
        w_stride = n if weight.dim() == 2 else 0
        _kernel(self._rms_train, x)(
            rows, heads, n, x.data_ptr(), stride, weight.data_ptr(), w_stride, eps,
            out.data_ptr(), rstd.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out, rstd

    def rms_norm_backward(
        self, x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
    ) -> torch.Tensor:
        """The input gradient of `rms_norm_train(x, weight, eps)` (which gave `rstd`) for the
        output gradient g, as a new contiguous tensor of x's shape and dtype."""
        rows, heads, n, stride = _rows_of_heads(x)
        g = g.to(x.dtype).contiguous()
        gx = torch.empty(x.shape, dtype=x.dtype)
        w_stride = n if weight.dim() == 2 else 0
        _kernel(self._rms_back, x, g)(
            rows, heads, n, x.data_ptr(), stride, g.data_ptr(), weight.data_ptr(), w_stride,
            rstd.data_ptr(), gx.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return gx

    def add_norm_train(
        self, x: torch.Tensor, y: torch.Tensor, w_out: torch.Tensor, w_next: torch.Tensor,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:  # fmt: skip
        """A residual step and the next norm: s = x + norm(y)·w_out, h = norm(s)·w_next, for
        x, y (rows, n) of one dtype, rows contiguous, and fp32 (n,) weights → (s, h, 1/rms of y,
        1/rms of s); None where they are laid out otherwise."""
        fits = x.dim() == 2 and all(_rows_of_heads(t)[1] == 1 for t in (x, y))
        fits = fits and x.dtype == y.dtype
        if (
            not fits
            or x.shape != y.shape
            or not all(_norm_weight(w, 1, x.shape[-1]) and w.dim() == 1 for w in (w_out, w_next))
        ):
            return None
        rows, n = x.shape
        s, h = torch.empty(rows, n, dtype=x.dtype), torch.empty(rows, n, dtype=x.dtype)
        rstd_y, rstd_s = torch.empty(rows), torch.empty(rows)
        _kernel(self._add_norm, x, y)(
            rows, n, x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), w_out.data_ptr(),
            w_next.data_ptr(), eps, s.data_ptr(), h.data_ptr(), rstd_y.data_ptr(),
            rstd_s.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return s, h, rstd_y, rstd_s

    def add_norm_backward(
        self, y: torch.Tensor, s: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor],
        rstd: tuple[torch.Tensor, torch.Tensor], g_s: torch.Tensor, g_h: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The gradients of x and y of `add_norm_train` (which gave s and `rstd`) for those of
        s and h."""
        rows, n = s.shape
        g_s, g_h = g_s.to(s.dtype).contiguous(), g_h.to(s.dtype).contiguous()
        g, g_y, tmp = (torch.empty(rows, n, dtype=s.dtype) for _ in range(3))
        _kernel(self._add_norm_back, y, s, g_s, g_h)(
            rows, n, y.data_ptr(), y.stride(0), s.data_ptr(), weights[0].data_ptr(),
            weights[1].data_ptr(), rstd[0].data_ptr(), rstd[1].data_ptr(), g_s.data_ptr(),
            g_h.data_ptr(), tmp.data_ptr(), g.data_ptr(), g_y.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return g, g_y

    @staticmethod
    def takes_gate_up(gu: torch.Tensor) -> bool:
        """Whether `gelu_times` takes gu: (rows, 2F) contiguous bf16 or fp32 on the CPU."""
        fits = gu.device.type == "cpu" and gu.dtype in (torch.bfloat16, torch.float32)
        return fits and gu.dim() == 2 and gu.shape[1] % 2 == 0 and gu.is_contiguous()

    def gelu_times(self, gu: torch.Tensor) -> torch.Tensor | None:
        """Training's MLP activation gelu-tanh(gate) · up of the fused gate/up output gu
        (rows, 2F) bf16 or fp32 → (rows, F) in its dtype (`gelu.c`); None where it does not
        take gu (`takes_gate_up`)."""
        if not self.takes_gate_up(gu):
            return None
        rows, f = gu.shape[0], gu.shape[1] // 2
        out = torch.empty(rows, f, dtype=gu.dtype)
        _kernel(self._gelu, gu)(rows, f, gu.data_ptr(), out.data_ptr(), torch.get_num_threads())
        return out

    def gelu_times_backward(self, gu: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The gradient in gu (rows, 2F) of `gelu_times(gu)` for the output's g (rows, F)."""
        g = g.to(gu.dtype).contiguous()
        rows, f = g.shape
        grad = torch.empty(rows, 2 * f, dtype=gu.dtype)
        _kernel(self._gelu_back, gu, g)(
            rows, f, gu.data_ptr(), g.data_ptr(), grad.data_ptr(), torch.get_num_threads()
        )
        return grad

    @staticmethod
    def takes_qk(
        qkv: torch.Tensor,
        weights: tuple[torch.Tensor, torch.Tensor],
        rope: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,
    ) -> bool:
        """Whether `qk_norm_rope` takes these: CPU tensors, qkv's rows contiguous, the norm
        weights fp32 (hd,) and the tables (·, hd) in qkv's dtype, contiguous; positions int64
        (T,)."""
        tables, hd = (*weights, *rope), rope[0].shape[-1]
        return (
            qkv.device.type == "cpu"
            and qkv.dtype in _KERNEL_SUFFIXES
            and qkv.stride(-1) == 1
            and all(t.is_contiguous() and t.device.type == "cpu" for t in tables)
            and all(w.dtype == torch.float32 and w.shape == (hd,) for w in weights)
            and all(t.dtype == qkv.dtype and t.dim() == 2 for t in rope)
            and positions.dtype == torch.int64
            and positions.is_contiguous()
            and positions.shape == (qkv.shape[0],)
        )

    def qk_norm_rope(
        self,
        qkv: torch.Tensor,
        heads: tuple[int, int],
        weights: tuple[torch.Tensor, torch.Tensor],
        eps: float,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,
        training: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Gemma's q and k from the fused qkv (B, ≥ (nh + nkv)·hd) bf16 or fp32: each head
        RMS-normed with its weight (q's, k's: (hd,) fp32), then rotated by the (cos, sin)
        tables' (qkv's dtype, (positions, hd)) rows at `positions` (B,) int64. A decode step's
        q (B, nh, hd) and k (B, nkv·hd); with `training`, q (nh, B, hd), k (nkv, B, hd) and each
        (token, head)'s 1 / rms (B, nh + nkv) for `qk_heads_backward`."""
        (nh, nkv), (q_w, k_w), (cos, sin) = heads, weights, rope
        rows, hd = qkv.shape[0], cos.shape[1]
        if not self.takes_qk(qkv, weights, rope, positions):
            raise ValueError("contiguous CPU rows, fp32 (hd,) weights, tables in qkv's dtype")
        if training:  # head-major: a head's rows one after another
            q = torch.empty(nh, rows, hd, dtype=qkv.dtype)
            k = torch.empty(nkv, rows, hd, dtype=qkv.dtype)
            rstd: torch.Tensor | None = torch.empty(rows, nh + nkv, dtype=torch.float32)
            q_head, q_row, k_head, k_row = rows * hd, hd, rows * hd, hd
        else:  # row-major: a row's heads one after another
            q = torch.empty(rows, nh, hd, dtype=qkv.dtype)
            k = torch.empty(rows, nkv * hd, dtype=qkv.dtype)
            rstd = None
            q_head, q_row, k_head, k_row = hd, nh * hd, hd, nkv * hd
        _kernel(self._qk, qkv, cos, sin)(
            rows, nh, nkv, hd, qkv.data_ptr(), qkv.stride(0), q_w.data_ptr(), k_w.data_ptr(),
            eps, cos.data_ptr(), sin.data_ptr(), positions.data_ptr(), q.data_ptr(), q_head,
            q_row, k.data_ptr(), k_head, k_row, None if rstd is None else rstd.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        return q, k, rstd

    def qk_heads_backward(
        self,
        qkv: torch.Tensor,
        heads: tuple[int, int],
        weights: tuple[torch.Tensor, torch.Tensor],
        rstd: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,
        gq: torch.Tensor,
        gk: torch.Tensor,
        grad: torch.Tensor,
    ) -> None:
        """The backward of `qk_norm_rope(training=True)` for q's and k's gradients (nh, T, hd)
        and (nkv, T, hd): the q and k heads' gradient written into grad's first (nh + nkv)·hd
        columns (T, ·), rows contiguous."""
        (nh, nkv), (q_w, k_w), (cos, sin) = heads, weights, rope
        rows, hd = qkv.shape[0], cos.shape[1]
        gq, gk = gq.contiguous(), gk.contiguous()
        if grad.stride(-1) != 1 or gq.dtype != qkv.dtype or gk.dtype != qkv.dtype:
            raise ValueError("the gradients in qkv's dtype, grad's rows contiguous")
        _kernel(self._qk_back, qkv, cos, sin, gq, gk, grad)(
            rows, nh, nkv, hd, qkv.data_ptr(), qkv.stride(0), q_w.data_ptr(), k_w.data_ptr(),
            rstd.data_ptr(), cos.data_ptr(), sin.data_ptr(), positions.data_ptr(),
            gq.data_ptr(), gk.data_ptr(), rows * hd, hd, grad.data_ptr(), grad.stride(0),
            torch.get_num_threads(),
        )  # fmt: skip

    def narrow_linear(self, weight: torch.Tensor) -> PackedLinear | None:
        """`weight` (out, in) fp32, with any strides (a transposed view reads as it lies), as
        bf16 in `linear.c`'s panels for `linear_bf16w`, in one pass; None if a value is not a
        bf16 value (narrowing would round it)."""
        if weight.dtype != torch.float32 or weight.dim() != 2 or weight.device.type != "cpu":
            raise ValueError("an fp32 weight (out, in) on the CPU")
        n_out, n_in = weight.shape
        size = -(-n_out // self.linear_panel) * self.linear_panel * n_in
        panels = torch.empty(size, dtype=torch.bfloat16)
        inexact = self._linear_pack_f32(
            n_out, n_in, weight.data_ptr(), *weight.stride(), panels.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        return PackedLinear(panels, n_out, n_in) if inexact == 0 else None

    # the most rows `tiles_linear` takes (`tiles.c`)
    TILES_MAX_ROWS = 1024

    def tiles_pack(self, weight: torch.Tensor) -> PackedLinear | None:
        """`weight` (out, in) bf16 packed for `tiles_linear`; None where the tiles do not run here
        or do not fit its shape (out a multiple of 16, in of 32)."""
        n_out, n_in = weight.shape
        if not self.tiles or weight.dtype != torch.bfloat16 or n_out % 16 or n_in % 32:
            return None
        panels = torch.empty(n_out * n_in, dtype=torch.bfloat16)
        self._tiles_pack(n_out, n_in, weight.contiguous().data_ptr(), panels.data_ptr())
        return PackedLinear(panels, n_out, n_in)

    def blocks_pack(self, blocks: Blocks) -> PackedBlocks | None:
        """A weight's GGUF blocks (`gguf_blocks.Blocks`) packed for `tiles_linear`, which then
        reads their codes (`tiles.c`: ~1.1-1.25 bytes a weight, not 2) and gets the bits it
        gets from the bf16 weight they round to; None where the tiles do not run here or do not
        fit its shape."""
        n_out, n_in = blocks.codes.shape
        if not self.tiles or n_out % 16 or n_in % 32 or blocks.block not in (16, 32):
            return None
        sets, offsets = 32 // blocks.block, int(blocks.offset is not None)
        record = self.blocks_record(sets, offsets)
        records = torch.empty(n_out // 16 * (n_in // 32) * record, dtype=torch.uint8)
        offset = blocks.offset.float().contiguous() if blocks.offset is not None else None
        self._qtiles_pack(
            n_out, n_in, blocks.codes.contiguous().data_ptr(),
            blocks.scale.float().contiguous().data_ptr(), blocks.block,
            offset.data_ptr() if offset is not None else None, records.data_ptr(),
        )  # fmt: skip
        return PackedBlocks(records, n_out, n_in, sets, offsets)

    def blocks_record(self, sets: int, offsets: int) -> int:
        """Bytes of one 16 x 32 tile of a `blocks_pack`."""
        return int(self._qtiles_record(sets, offsets))

    def tiles_linear(
        self, x: torch.Tensor, weight: PackedLinear | PackedBlocks
    ) -> torch.Tensor | None:
        """x (rows, in) bf16 @ W^T for W packed by `tiles_pack` or `blocks_pack` → (rows, out)
        bf16, by AMX tiles (`tiles.c`): a row's bits do not depend on the other
        rows; None for more than `TILES_MAX_ROWS` rows."""
        rows, n_in = x.shape
        if rows > self.TILES_MAX_ROWS or x.dtype != torch.bfloat16 or n_in != weight.n_in:
            return None
        x = x.contiguous()
        y = torch.empty(rows, weight.n_out, dtype=torch.bfloat16)
        threads = torch.get_num_threads()
        if isinstance(weight, PackedBlocks):
            status = self._qtiles_linear(
                rows, n_in, weight.n_out, x.data_ptr(), weight.records.data_ptr(), weight.sets,
                weight.offsets, y.data_ptr(), threads,
            )  # fmt: skip
        else:
            status = self._tiles_linear(
                rows, n_in, weight.n_out, x.data_ptr(), weight.panels.data_ptr(), y.data_ptr(),
                threads,
            )  # fmt: skip
        return y if status == 0 else None

    def gemm_pack(self, weight: torch.Tensor) -> PackedLinear | None:
        """`weight` (out, in) bf16 packed for `tiles_gemm`; None where the tiles do not run here
        or do not take the shape (out and in multiples of 32)."""
        return self.tiles_pack(weight) if weight.shape[0] % 32 == 0 else None

    def tiles_gemm(
        self,
        x: torch.Tensor,
        weight: PackedLinear,
        extra: tuple[torch.Tensor, PackedLinear] | None = None,
    ) -> torch.Tensor | None:
        """x (rows, in) bf16 @ Wᵀ for W packed by `gemm_pack` → (rows, out) bf16, by AMX tiles
        for many rows (`tiles_gemm.c`: a training step's), with `tiles_linear`'s bits for each
        row; with `extra` (x2 (rows, in2) bf16, W2 (out, in2) packed), + x2 W2ᵀ in the same sums
        (the bits of one product over x and x2 side by side). None where it does not run."""
        rows, n_in = x.shape
        if x.dtype != torch.bfloat16 or n_in != weight.n_in or weight.n_out % 32 or rows == 0:
            return None
        x2, w2 = extra if extra is not None else (None, None)
        if x2 is not None and w2 is not None:
            if x2.dtype != torch.bfloat16 or x2.shape != (rows, w2.n_in):
                return None
            if w2.n_out != weight.n_out:
                return None
            x2 = x2.contiguous()
        x = x.contiguous()
        y = torch.empty(rows, weight.n_out, dtype=torch.bfloat16)
        status = self._tiles_gemm(
            rows, n_in, weight.n_out, x.data_ptr(), weight.panels.data_ptr(),
            0 if w2 is None else w2.n_in, None if x2 is None else x2.data_ptr(),
            None if w2 is None else w2.panels.data_ptr(), y.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return y if status == 0 else None

    def lora_tn(
        self, u: torch.Tensor, g: torch.Tensor, scale: float, transposed: bool = False
    ) -> torch.Tensor | None:
        """scale · uᵀ g (r, m) fp32, or its transpose (m, r) laid out so, for u (n, r) and g
        (n, m) bf16 with contiguous rows, by AMX tiles (`lora_tiles.c`: a LoRA's weight
        gradients over a step's rows); None where it does not run (no tiles; r not 16 or 32,
        m not a multiple of 32)."""
        if not self.tiles or u.dtype != torch.bfloat16 or g.dtype != torch.bfloat16:
            return None
        (n, r), m = u.shape, g.shape[1]
        if g.shape[0] != n or u.stride(1) != 1 or g.stride(1) != 1 or r not in (16, 32):
            return None
        c = torch.empty((m, r) if transposed else (r, m), dtype=torch.float32)
        status = self._lora_tiles_tn(
            n, r, m, u.data_ptr(), u.stride(0), g.data_ptr(), g.stride(0), scale,
            int(transposed), c.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return c if status == 0 else None

    @property
    def steps(self) -> bool:
        """Whether `decode_step` runs here: AMX tiles, and torch's AVX-512 tanh found, with which
        the step's gelu gives torch's bits."""
        return self._gelu_table is not None

    def gelu_times_torch(self, gu: torch.Tensor) -> torch.Tensor:
        """(B, 2f) bf16 → `F.gelu(gate, approximate="tanh") * up` (B, f) by the step's kernel,
        with torch's bits (where `steps`)."""
        rows, f = gu.shape[0], gu.shape[1] // 2
        table = self._gelu_table
        if table is None or gu.dtype != torch.bfloat16 or f % 16 or not gu.is_contiguous():
            raise ValueError("the step's gelu: contiguous bf16 rows of 2f, f a multiple of 16")
        out = torch.empty(rows, f, dtype=torch.bfloat16)
        self._gelu_torch(rows, f, gu.data_ptr(), out.data_ptr(), table.data_ptr(), 1)
        return out

    def _torchs_gelu_table(self, tanh16: int) -> torch.Tensor | None:
        """The step's gelu table (`tunery_gelu_table`) made with `tanh16`, where the step's gelu
        with it gives torch's bits: on every finite bf16 gate (and -inf), each times an up of
        either sign and a few magnitudes; else None."""
        table = torch.empty(2**16 + 1, dtype=torch.int16)
        self._gelu_table_of(tanh16, table.data_ptr())
        gate = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
        gate = gate.view(torch.bfloat16)
        gate = gate[~gate.isnan() & (gate != float("inf"))]
        gate = gate[: gate.numel() // 16 * 16].view(-1, 16)
        up = torch.tensor([1.0, -3.5, 0.0078125, 117.0] * 4, dtype=torch.bfloat16)
        up = up.expand_as(gate)
        gu, out = torch.cat([gate, up], 1), torch.empty_like(gate)
        self._gelu_torch(gate.shape[0], 16, gu.data_ptr(), out.data_ptr(), table.data_ptr(), 1)
        want = torch.nn.functional.gelu(gate, approximate="tanh") * up
        return table if torch.equal(out.view(torch.int16), want.view(torch.int16)) else None

    def step_model(self, fields: Sequence[int], tensors: Sequence[torch.Tensor]) -> StepModel:
        """A model as `decode_step` reads it (see `decode_step.c`'s layout), keeping `tensors`
        (what the fields point into) alive."""
        return StepModel(torch.tensor(fields, dtype=torch.int64), list(tensors))

    def decode_step(
        self,
        model: StepModel,
        eps: float,
        scale: float,
        x: torch.Tensor,
        positions: torch.Tensor,
        caches: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        spans: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """A whole decode step (`decode_step.c`): x (B, C) bf16 the tokens' scaled embeddings
        (overwritten: the residual stream), positions (B,) int64; `caches` each layer's K and V
        data pointers and ring sizes (L, B) int64; `spans` (row_lo, row_hi) (S,) int64 and each
        layer's groups' LoRA desc pointers (L, 4, S) int64 (0: none). Returns the final norm
        (B, C)."""
        table = self._gelu_table
        if table is None:
            raise RuntimeError("the decode step does not run here")
        rows = x.shape[0]
        if rows > self.TILES_MAX_ROWS or x.dtype != torch.bfloat16 or not x.is_contiguous():
            raise ValueError(f"contiguous bf16 rows, at most {self.TILES_MAX_ROWS}")
        (k, v, sizes), (lo, hi, lora) = caches, spans
        out = torch.empty_like(x)
        status = self._step(
            model.fields.data_ptr(), eps, scale, rows, x.data_ptr(), positions.data_ptr(),
            k.data_ptr(), v.data_ptr(), sizes.data_ptr(), lo.shape[0], lo.data_ptr(),
            hi.data_ptr(), lora.data_ptr(), table.data_ptr(), out.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("decode step: out of memory")
        return out

    def linear_bf16w(self, x: torch.Tensor, weight: PackedLinear) -> torch.Tensor:
        """x (rows, in) fp32 @ W^T, W (out, in) bf16 packed by `narrow_linear` → (rows, out)
        fp32, each output one running sum over `in` in order (`linear.c`): a row's bits do not
        depend on the other rows."""
        y = _linear_output(x, weight.n_out, weight.n_in)
        rows, n_in = x.shape
        status = self._linear(
            rows, n_in, weight.n_out, x.data_ptr(), x.stride(0), weight.panels.data_ptr(),
            y.data_ptr(), y.stride(0), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("linear: out of memory")
        return y

    def int8_linear(self, q: torch.Tensor, scale: torch.Tensor) -> Int8Linear:
        """An int8 weight (out, in) with one scale per output (q · scale ≈ W) in `linear.c`'s
        panels for `linear_i8w`."""
        if q.dtype != torch.int8 or q.dim() != 2 or scale.shape != (q.shape[0],):
            raise ValueError("an int8 weight (out, in) and a scale per output")
        n_out, n_in = q.shape
        width = self.linear_panel
        count = -(-n_out // width)
        padded = torch.zeros(count * width, n_in, dtype=torch.int8)
        padded[:n_out] = q
        panels = padded.view(count, width, n_in).transpose(1, 2).contiguous()  # (P, in, PANEL)
        scales = torch.zeros(count * width)
        scales[:n_out] = scale.float()
        return Int8Linear(panels, scales, n_out, n_in)

    def linear_i8w(self, x: torch.Tensor, weight: Int8Linear) -> torch.Tensor:
        """x (rows, in) fp32 @ (q · scale)^T for an `int8_linear` weight → (rows, out) fp32; a
        row's bits do not depend on the other rows (see `linear_bf16w`)."""
        y = _linear_output(x, weight.n_out, weight.n_in)
        rows, n_in = x.shape
        status = self._linear_i8(
            rows, n_in, weight.n_out, x.data_ptr(), x.stride(0), weight.panels.data_ptr(),
            weight.scale.data_ptr(), y.data_ptr(), y.stride(0), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("int8 linear: out of memory")
        return y

    def pack_head(self, weight: torch.Tensor) -> PackedHead | None:
        """`weight` (V, C) bf16 or fp32 on the CPU, packed for `best_tokens`; None where this
        CPU lacks the kernel (AVX512-VNNI or AVX2) or the shape does not fit it (C a multiple of
        4)."""
        fits = weight.dtype in _HEAD_DTYPES and weight.device.type == "cpu"
        if not self._head_ok or not fits or weight.shape[1] % 4:
            return None
        weight = weight.contiguous()
        head = PackedHead(weight)
        self._head_pack(
            weight.shape[0], weight.shape[1], weight.data_ptr(), _HEAD_DTYPES[weight.dtype],
            head.int8.data_ptr(),
            head.scale.data_ptr(), head.norm.data_ptr(), head.err_norm.data_ptr(),
            head.offset.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return head

    def best_tokens(
        self, hidden: torch.Tensor, head: PackedHead, limit: int = 1 << 30
    ) -> list[int]:
        """(B, C) in the head's dtype → each row's index of its largest logit over the head
        (exact fp32 dot products; for bf16 rounded to bf16, as a bf16 head's logits are), the
        first of equal ones; -1 for a row that is not finite or whose int8 scores leave more
        than `limit` candidates. See `head.c`."""
        if hidden.dtype != head.weight.dtype or hidden.stride(-1) != 1:
            raise ValueError(f"{head.weight.dtype} rows, contiguous")
        rows, c = hidden.shape
        out = torch.empty(rows, dtype=torch.int64)
        status = self._head_argmax(
            rows, c, head.weight.shape[0], hidden.data_ptr(), hidden.stride(0),
            head.int8.data_ptr(), head.scale.data_ptr(), head.norm.data_ptr(),
            head.err_norm.data_ptr(), head.offset.data_ptr(), head.weight.data_ptr(),
            _HEAD_DTYPES[hidden.dtype], limit,
            head.scratch(rows).data_ptr(), out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("head argmax: out of memory")
        return out.tolist()

    def top_logits(
        self, hidden: torch.Tensor, weight: torch.Tensor | PackedBlocks, k: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, C) bf16 rows and a bf16 head (V, C) → each row's k largest logits, fp32 (AMX sums
        rounded to bf16), largest first and the first of equal ones first, and their tokens:
        ((B, k), (B, k) int64), in one read of the head (`head_topk.c`); of a head packed as
        GGUF blocks (`blocks_pack`), the same as of the bf16 head they make. A row with fewer
        than k finite logits gets token -1 first. None where the kernel does not run (no AMX
        tiles, other dtypes or shapes)."""
        rows, c = hidden.shape
        blocks = isinstance(weight, PackedBlocks)
        vocab = weight.n_out if isinstance(weight, PackedBlocks) else weight.shape[0]
        dtype = torch.bfloat16 if isinstance(weight, PackedBlocks) else weight.dtype
        fits = self.head_topk and hidden.dtype == dtype == torch.bfloat16
        contiguous = blocks or (isinstance(weight, torch.Tensor) and weight.is_contiguous())
        if not fits or c % 32 or not contiguous or hidden.stride(-1) != 1:
            return None
        if not 0 < k <= vocab:
            raise ValueError(f"k must be in [1, {vocab}]")
        values = torch.empty(rows, k)
        tokens = torch.empty(rows, k, dtype=torch.int64)
        threads = torch.get_num_threads()
        if isinstance(weight, PackedBlocks):
            status = self._head_topk_blocks(
                rows, c, vocab, hidden.data_ptr(), hidden.stride(0), weight.records.data_ptr(),
                weight.sets, weight.offsets, k, values.data_ptr(), tokens.data_ptr(), threads,
            )  # fmt: skip
        else:
            status = self._head_topk(
                rows, c, vocab, hidden.data_ptr(), hidden.stride(0), weight.data_ptr(), k,
                values.data_ptr(), tokens.data_ptr(), threads,
            )  # fmt: skip
        if status != 0:
            raise MemoryError("head top-k: out of memory")
        return values, tokens

    def head_loss(
        self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, grad: bool,
        skipped_mass: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:  # fmt: skip
        """Each label row's cross-entropy over the vocab head and (`grad`) its gradient, in one
        read of the head (`head_loss.c`): hidden (N, C) fp32, weight (V, C) bf16 or fp32, labels
        (N,) int64 → (loss (N,), d loss / d hidden (N, C) or None), fp32. The gradient leaves
        out softmax terms below `skipped_mass` / V, less than `skipped_mass` of probability in
        all (its error at most that times the largest row norm of the weight); the loss is exact.
        A bf16 weight is multiplied by AMX tiles where `head_loss_tile_rows` takes the rows: of the
        hidden rows rounded to bf16, as a bf16 matmul does.
        None where the kernel does not take the shapes (C not a multiple of 8 vectors: 64 on
        AVX2, 128 with AVX-512) or the tensors are not on the CPU."""
        rows, c = hidden.shape
        fits = weight.dtype in _HEAD_DTYPES and weight.device.type == "cpu"
        if not fits or hidden.dtype != torch.float32 or hidden.device.type != "cpu":
            return None
        hidden, weight = hidden.contiguous(), weight.contiguous()
        labels = labels.to(torch.int64).contiguous()
        loss = torch.empty(rows, dtype=torch.float32)
        out = torch.empty(rows, c, dtype=torch.float32) if grad else None
        status = self._head_loss(
            rows, c, weight.shape[0], hidden.data_ptr(), weight.data_ptr(),
            _HEAD_DTYPES[weight.dtype], labels.data_ptr(), loss.data_ptr(),
            out.data_ptr() if out is not None else None, skipped_mass / weight.shape[0],
            torch.get_num_threads(),
        )  # fmt: skip
        if status == -1:
            raise MemoryError("head loss: out of memory")
        if status == -2:
            raise ValueError(f"a label outside the vocabulary of {weight.shape[0]}")
        return None if status == -3 else (loss, out)

    def softmax_xent(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Each row's cross-entropy against its label, fp32 (N,), with the logits (N, V), bf16
        or fp32, turned in place into its gradient softmax - onehot(label) (`head_loss.c`); None
        where the kernel does not take them (another dtype or device, not contiguous)."""
        fits = logits.dtype in _HEAD_DTYPES and logits.device.type == "cpu"
        if not fits or logits.dim() != 2 or not logits.is_contiguous():
            return None
        labels = labels.to(torch.int64).contiguous()
        loss = torch.empty(logits.shape[0], dtype=torch.float32)
        status = self._softmax_xent(
            logits.shape[0], logits.shape[1], logits.data_ptr(), _HEAD_DTYPES[logits.dtype],
            labels.data_ptr(), loss.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status == -2:
            raise ValueError(f"a label outside the vocabulary of {logits.shape[1]}")
        return loss


_HEAD_DTYPES = {torch.bfloat16: 0, torch.float32: 1}  # head.c's `fp32` flag


def _rows_of_heads(x: torch.Tensor) -> tuple[Any, int, int, int]:
    """x (rows, n) or (rows, heads, n), each row's heads one run of values (rows may lie apart) →
    (rows, heads, n, row stride); rows None where x is laid out otherwise or off the CPU."""
    if x.device.type != "cpu" or x.dim() not in (2, 3) or x.stride(-1) != 1:
        return None, 0, 0, 0
    if x.dtype not in (torch.bfloat16, torch.float32):
        return None, 0, 0, 0
    n = x.shape[-1]
    heads = x.shape[1] if x.dim() == 3 else 1
    if x.dim() == 3 and heads > 1 and x.stride(1) != n:
        return None, 0, 0, 0
    return x.shape[0], heads, n, x.stride(0)


def _norm_weight(weight: torch.Tensor, heads: int, n: int) -> bool:
    """Whether `weight` is an RMS norm's fp32 weight for `heads` heads of n: (n,) or (heads, n)."""
    shape_ok = weight.shape in ((n,), (heads, n))
    return shape_ok and weight.dtype == torch.float32 and weight.is_contiguous()


def _linear_output(x: torch.Tensor, n_out: int, n_in: int) -> torch.Tensor:
    """The (rows, n_out) fp32 output of x (rows, n_in) by `linear.c`'s panels; x checked."""
    if x.dtype != torch.float32 or x.stride(-1) != 1:
        raise ValueError("contiguous fp32 rows")
    if x.shape[1] != n_in:
        raise ValueError(f"x has {x.shape[1]} columns, the weight {n_in}")
    return torch.empty(x.shape[0], n_out)


class PackedLinear:
    """A bf16 weight (out, in) in `linear.c`'s panels (k-major, zero-padded)."""

    def __init__(self, panels: torch.Tensor, n_out: int, n_in: int) -> None:
        self.panels, self.n_out, self.n_in = panels, n_out, n_in


class PackedBlocks:
    """A weight's GGUF blocks in `tiles.c`'s records: codes, `sets` scales (1: one per 32
    inputs, 2: per 16) and (`offsets` 1) offsets a tile."""

    def __init__(self, records: torch.Tensor, n_out: int, n_in: int, sets: int, offsets: int):
        self.records, self.n_out, self.n_in = records, n_out, n_in
        self.sets, self.offsets = sets, offsets

    @property
    def kind(self) -> int:
        """How the whole-step kernel is told the layout (`decode_step.c`): sets + 4 offsets."""
        return self.sets + 4 * self.offsets


class Int8Linear:
    """An int8 weight (out, in) in `linear.c`'s panels, with its per-output scales (padded)."""

    def __init__(self, panels: torch.Tensor, scale: torch.Tensor, n_out: int, n_in: int) -> None:
        self.panels, self.scale, self.n_out, self.n_in = panels, scale, n_out, n_in


# A kernel's build for each element type: `name` for bf16, `name_f32` for fp32 (`elem.h`).
_KERNEL_SUFFIXES = {torch.bfloat16: "", torch.float32: "_f32"}
Kernel = dict[torch.dtype, Any]


def _by_dtype(library: ctypes.CDLL, name: str, argtypes: list[Any], restype: Any) -> Kernel:
    """Kernel `name`'s builds by element type, each with the ctypes signature they share."""
    builds: Kernel = {}
    for dtype, suffix in _KERNEL_SUFFIXES.items():
        function = getattr(library, name + suffix)
        function.argtypes, function.restype = argtypes, restype
        builds[dtype] = function
    return builds


def _kernel(builds: Kernel, *tensors: torch.Tensor, dtype: torch.dtype | None = None) -> Any:
    """The build for the tensors' element type: they (and `dtype`, when given) must agree on
    bf16 or fp32, as the C side reads them all as one type."""
    kinds = {t.dtype for t in tensors} | ({dtype} if dtype is not None else set())
    if len(kinds) != 1 or not kinds <= builds.keys():
        raise ValueError(
            f"the kernels take all bf16 or all fp32 tensors, not {sorted(map(str, kinds))}"
        )
    return builds[kinds.pop()]


class StepModel:
    """A model's weights as `decode_step.c` reads them: its int64 fields (sizes, and pointers
    into `tensors`, kept alive here)."""

    def __init__(self, fields: torch.Tensor, tensors: list[torch.Tensor]) -> None:
        self.fields, self._tensors = fields, tensors


def _torch_tanh16() -> int | None:
    """The address of the AVX-512 tanh torch's own kernels call (SLEEF's, which libtorch_cpu
    exports), or None where it has none."""
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        function = ctypes.CDLL(str(library)).Sleef_tanhf16_u10
    except (OSError, AttributeError):
        return None
    return ctypes.cast(function, ctypes.c_void_p).value


class PackedHead:
    """A vocab head (V, C) bf16 or fp32 as `head.c` reads it: an int8 copy in its blocked
    layout and each vocab row's scale, norms and offset; the weight itself (not copied) for the
    exact logits of the candidates."""

    BLOCK = 16  # vocab rows per packed block (head.c's BLOCK)

    def __init__(self, weight: torch.Tensor) -> None:
        v, c = weight.shape
        padded = -(-v // self.BLOCK) * self.BLOCK
        self.weight = weight
        self.int8 = torch.zeros(padded * c, dtype=torch.int8)
        self.scale, self.norm, self.err_norm = (torch.zeros(padded) for _ in range(3))
        self.offset = torch.zeros(padded, dtype=torch.int32)
        self._scratch = torch.empty(0)  # each row's upper bounds, then its candidates

    @classmethod
    def of(
        cls,
        weight: torch.Tensor,
        int8: torch.Tensor,
        scale: torch.Tensor,
        norm: torch.Tensor,
        err_norm: torch.Tensor,
        offset: torch.Tensor,
    ) -> PackedHead:
        """The pack of `weight` from its parts, as `NativeKernels.pack_head` made them (read back
        from a file); ValueError where they do not fit `weight`."""
        head = cls.__new__(cls)
        weight = weight.contiguous()  # as pack_head packs it
        v, c = weight.shape
        padded = -(-v // cls.BLOCK) * cls.BLOCK
        parts = {
            "int8": (int8, torch.int8, padded * c), "scale": (scale, torch.float32, padded),
            "norm": (norm, torch.float32, padded), "err_norm": (err_norm, torch.float32, padded),
            "offset": (offset, torch.int32, padded),
        }  # fmt: skip
        for name, (tensor, dtype, numel) in parts.items():
            if tensor.dtype != dtype or tensor.numel() != numel or not tensor.is_contiguous():
                raise ValueError(f"a head pack's {name} does not fit a ({v}, {c}) head")
            setattr(head, name, tensor)
        head.weight = weight
        head._scratch = torch.empty(0)
        return head

    def scratch(self, rows: int) -> torch.Tensor:
        """(rows, padded V) fp32 work space, kept between calls (its pages stay mapped)."""
        need = rows * self.scale.numel()
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need)
        return self._scratch

    @property
    def nbytes(self) -> int:
        return self.int8.numel() + 16 * self.scale.numel()


class CacheTable:
    """One layer's K and V caches of a step's rows as the attention kernel reads them: each
    row's K and V data pointers and ring size, int64 (B,) each, and the caches' dtype. The
    caches must outlive it."""

    def __init__(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        sizes: torch.Tensor,
        kv_heads: int,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        self.k, self.v, self.sizes, self.kv_heads, self.dtype = k, v, sizes, kv_heads, dtype
        self._alive: object = None

    @staticmethod
    def of(k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor]) -> CacheTable:
        """From each row's (nkv, size, hd) K and V caches, contiguous, of one dtype."""
        for t in (*k_caches, *v_caches):
            if not t.is_contiguous() or t.dtype != k_caches[0].dtype:
                raise ValueError("caches must be contiguous and of one dtype")
        k = torch.tensor([c.data_ptr() for c in k_caches], dtype=torch.int64)
        v = torch.tensor([c.data_ptr() for c in v_caches], dtype=torch.int64)
        sizes = torch.tensor([c.shape[1] for c in k_caches], dtype=torch.int64)
        table = CacheTable(k, v, sizes, k_caches[0].shape[0], k_caches[0].dtype)
        table._alive = (k_caches, v_caches)  # the caches live as long as the table
        return table


class LoraDesc:
    """One fused group's LoRA as `lora_delta.c` reads it: A (r, in) and each part's B
    (out_part, r_part), fp32 and contiguous (not copied: kept alive here), and their layout."""

    def __init__(self, a: torch.Tensor, parts: Sequence[Part]) -> None:
        self._tensors = [a, *(p[4] for p in parts)]
        fields = [a.shape[1], a.shape[0], len(parts), a.data_ptr()]
        for c_lo, c_hi, r_lo, r_hi, b in parts:
            fields += [c_lo, c_hi, r_lo, r_hi, b.data_ptr()]
        self._fields = torch.tensor(fields, dtype=torch.int64)
        self.pointer = self._fields.data_ptr()
        self.rank, self.in_features = a.shape
        self.part_shapes = [(c_hi - c_lo, r_hi - r_lo) for c_lo, c_hi, r_lo, r_hi, _ in parts]
        self.part_sizes = [rows * cols for rows, cols in self.part_shapes]

    @staticmethod
    def of(a: torch.Tensor, parts: Sequence[Part]) -> LoraDesc | None:
        """The desc of these weights, or None where the kernel cannot read them in place."""
        tensors = [a, *(p[4] for p in parts)]
        if all(t.dtype == torch.float32 and t.is_contiguous() and not t.is_cuda for t in tensors):
            return LoraDesc(a, parts)
        return None


@cache
def _library() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler: decode steps keep torch's kernels")
        return None
    source = b"".join(path.read_bytes() for path in [*_SOURCES, *_HEADERS])
    key = hashlib.sha256(source + repr((compiler, _FLAGS, _cpu())).encode()).hexdigest()[:16]
    target = _cache_dir() / f"tunery-kernels-{key}.so"
    try:
        if not target.exists() and not _compile(compiler, target):
            return None
        return ctypes.CDLL(str(target))  # torch, imported above, brought the libgomp it shares
    except OSError as e:  # an unwritable cache, a compiler that cannot run, a bad library
        log.warning("native kernels unavailable (decode steps keep torch's kernels): %s", e)
        return None


def _compile(compiler: str, target: Path) -> bool:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        sources = [str(path) for path in _SOURCES]
        for openmp in (["-fopenmp"], []):  # a compiler without OpenMP builds them serial
            cmd = [compiler, *_FLAGS, *openmp, "-o", str(built), *sources, "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode == 0:
                os.replace(built, target)  # atomic: concurrent processes see one whole file
                return True
    log.warning("could not compile the native kernels: %s", done.stderr[-500:])
    return False


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "tunery" / "native"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"tunery-native-{os.getuid()}"


def _cpu() -> str:
    """What `-march=native` compiles for: a build is reused only on the same kind of CPU."""
    info = _cpuinfo()
    if info is None:
        return platform.processor() or platform.machine()
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    model = next((line for line in info.splitlines() if line.startswith("model name")), "")
    return model + flags


def _cpuinfo() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags as Linux names them (`avx512_bf16`, `amx_bf16`...), or None
    where /proc/cpuinfo does not say."""
    info = _cpuinfo()
    line = next((x for x in (info or "").splitlines() if x.startswith("flags")), None)
    return frozenset(line.partition(":")[2].split()) if line is not None else None
