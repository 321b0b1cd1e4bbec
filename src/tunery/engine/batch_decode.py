"""One decode step for many requests at once on a `FastGemma3`: each batch row has its own KV
cache, position and LoRA adapter (or none), and gets the same bits whatever else is in the batch,
so batching never changes an answer.

What is shared and what is not (each choice measured on this CPU, bf16 weights):
- The base projections and the vocab head run as one matmul over all rows, so the weights are read
  once per step instead of once per request, which is where batching wins (greedy rows skip the
  full head where `FastGemma3.best_tokens` has its packed int8 copy, one pass for all rows).
  oneDNN's packed bf16 matmul rounds each row alike for any count from 2 to 32 rows (1 to 8
  threads; on a CPU with AVX512-BF16 and no AMX up to 1,200 rows, but with AMX from 33 rows up
  it blocks the rows otherwise: `MAX_ROWS` keeps a step within 32), but a 1-row matmul takes
  another kernel (not with AMX) whose sums differ in rare cancelling cases by one bf16 ulp: a lone
  row is therefore padded to two (`pad_rows`; not on the native kernels' panels or AMX tiles,
  where a row's sums do not depend on the others: `FastGemma3.lone_row_exact`; with AMX the
  projections of up to 64 rows run on the tiles, `native/tiles.c`), so a request decodes the same
  alone or batched (new prompts share their matmuls the same way: `FastGemma3.prefill_many`).
  Against `FastGemma3.step` (1 row) the tokens are the same unless such an ulp decides a near
  tie.
- Attention, LoRA and the norms run per row, each row in an order fixed by its own cache and
  adapter: by the C kernels (`native`, one call per layer for all rows; with AMX tiles one call
  for the whole step, `FastGemma3.native_step`) where they build, else
  in torch. There LoRA runs per adapter on its contiguous range of rows (rows are ordered by
  adapter), as Punica/LoRAX group them: a 1-row fp32 `F.linear` and a many-row one round
  differently, but a `bmm` of (m, 1, in) rows with the adapter's transposed weight expanded over
  m matches the 1-row call exactly; and attention is one SDPA per row (a padded batch with a mask
  sums in another order), ~40 µs per row and layer with the slicing around it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunery.engine.fast_decode import (
    GROUPS,
    FastGemma3,
    FastLora,
    KVCache,
    _gelu_times,
    _Layer,
    _rope,
    cache_pointers,
)
from tunery.engine.native import CacheTable, LoraDesc, NativeKernels

MAX_ROWS = 32  # requests per step at most (≤ `Linear.NATIVE_INT8_MAX_ROWS`; see above)
# aten's bmm computes a product of fewer multiply-adds than this with its own loop, which rounds
# unlike the BLAS call a 1-row `F.linear` makes: such (tiny) products run row by row instead.
_BMM_NAIVE_BELOW = 400


@dataclass(frozen=True)
class _Group32:
    """A `_LoraGroup` in fp32, transposed for `bmm`: at (in, r); parts' bt (r_part, out_part)."""

    at: torch.Tensor
    parts: tuple[tuple[int, int, int, int, torch.Tensor], ...]  # out_lo, out_hi, r_lo, r_hi, bt
    full: bool  # one part covering every output column (PEFT's single-projection form)


class Lora32:
    """An adapter's weights as the batched step reads them: with the native kernels, its groups'
    descs (no copy); else fp32 (what the single-stream path converts to at every call, so
    converting once changes no bit), laid out for `bmm`."""

    def __init__(self, lora: FastLora, fast: FastGemma3) -> None:
        self.layers: list[dict[str, _Group32]] = []
        self.descs: list[dict[str, LoraDesc]] | None = None
        self.pointers: torch.Tensor | None = None  # the descs for the whole-step kernel
        if fast.native is not None:  # the groups' own (their B read as it lies: no copy)
            descs = [{name: g.desc for name, g in groups.items()} for groups in lora.layers]
            if all(d is not None for groups in descs for d in groups.values()):
                self.descs = descs  # type: ignore[assignment]
                self.pointers = lora.desc_pointers
                return
        for groups in lora.layers:
            out: dict[str, _Group32] = {}
            for name, g in groups.items():
                width = sum(fast.out_features[m] for m in _MEMBERS[name])
                parts = tuple((lo, hi, rl, rh, b.float().t()) for lo, hi, rl, rh, b in g.parts)
                full = len(parts) == 1 and parts[0][1] - parts[0][0] == width
                out[name] = _Group32(g.a.float().t(), parts, full)
            self.layers.append(out)


_MEMBERS = dict(GROUPS)

# A run of consecutive rows sharing one adapter: (first row, end row, its weights or None).
Span = tuple[int, int, Lora32 | None]


def step_rows(
    fast: FastGemma3, tokens: torch.Tensor, caches: Sequence[KVCache], spans: Sequence[Span]
) -> torch.Tensor:
    """Feed one token per row (B,) at each row's next position; return hidden states (B, C).

    `caches[r]` is row r's own batch-1 cache; `spans` cover the rows in order, one per adapter.
    """
    if tokens.shape[0] == 1 and not fast.lone_row_exact:  # see the module docstring
        both = [(lo, 2, lora) for lo, _, lora in spans]  # the pad row shares row 0's adapter
        return step_rows(fast, tokens.repeat(2), [caches[0], _Shadow(caches[0])], both)[:1]
    b = tokens.shape[0]
    if not 0 < b <= MAX_ROWS or len(caches) != b:
        raise ValueError(f"{b} rows (at most {MAX_ROWS}) and {len(caches)} caches")
    positions = [c.length for c in caches]
    if any(p >= c.max_len for p, c in zip(positions, caches, strict=True)):
        raise ValueError("a cache is full")
    hd, nh, nkv = fast.head_dim, fast.n_heads, fast.n_kv
    index = torch.tensor(positions, device=fast.device)
    if fast.step_model is not None and all(
        s[2] is None or s[2].pointers is not None for s in spans
    ):
        hidden = fast.native_step(
            tokens,
            index,
            cache_pointers(caches),
            fast.step_spans([(lo, hi, None if w is None else w.pointers) for lo, hi, w in spans]),
        )
        for cache, pos in zip(caches, positions, strict=True):
            cache.length = pos + 1
        return hidden
    x = F.embedding(tokens, fast.embed) * fast.embed_scale  # (B, C)
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # torch's RoPE only: rows' cos, sin
    if fast.native is None:
        rope = {k: (c[index].view(b, 1, 1, hd), s[index].view(b, 1, 1, hd))
                for k, (c, s) in fast._rope.items()}  # fmt: skip
    tables = _cache_tables(caches, fast.n_kv, fast.dtype) if fast.native is not None else []
    for i, layer in enumerate(fast.layers):
        h = fast.norm_rows(x, layer.ln_in)
        qkv = _add_lora(layer.qkv(h), h, spans, i, "qkv", fast.native)
        if fast.native is not None:  # one call for every row: see `native`
            a = fast.attend_native(i, qkv, tables[i], index)
            x = _after_attention(fast, x, a, layer, i, spans)
            continue
        cos, sin = rope["sliding" if layer.sliding else "full"]
        q = fast.norm_rows(qkv[:, : nh * hd], layer.q_norm, nh).view(b, nh, 1, hd)
        k = fast.norm_rows(qkv[:, nh * hd : (nh + nkv) * hd], layer.k_norm, nkv)
        q, k = _rope(q, cos, sin), _rope(k.view(b, nkv, 1, hd), cos, sin)
        v = qkv[:, (nh + nkv) * hd :].view(b, nkv, 1, hd)
        outs = []
        for r, (cache, pos) in enumerate(zip(caches, positions, strict=True)):
            size = cache.sizes[i]
            slot = pos % size
            ck, cv = cache.k[i], cache.v[i]
            ck[:, :, slot : slot + 1] = k[r : r + 1]
            cv[:, :, slot : slot + 1] = v[r : r + 1]
            n = min(pos + 1, size)  # every filled slot is inside the window: no mask
            outs.append(
                F.scaled_dot_product_attention(
                    q[r : r + 1], ck[:, :, :n], cv[:, :, :n], scale=fast.scaling, enable_gqa=True
                )
            )
        a = torch.cat(outs).reshape(b, nh * hd)
        x = _after_attention(fast, x, a, layer, i, spans)
    for cache, pos in zip(caches, positions, strict=True):
        cache.length = pos + 1
    return fast.norm_rows(x, fast.final_norm)


def pad_rows(hidden: torch.Tensor) -> torch.Tensor:
    """(1, C) → (2, C) by repeating the row, so a matmul on it takes the many-row kernel."""
    return hidden.repeat(2, 1) if hidden.shape[0] == 1 else hidden


def _cache_tables(caches: Sequence[KVCache], kv_heads: int, dtype: torch.dtype) -> list[CacheTable]:
    """Every layer's `CacheTable` of the rows' batch-1 caches (`dtype`), made at once for a
    step."""
    k, v, sizes = cache_pointers(caches)
    return [CacheTable(k[i], v[i], sizes[i], kv_heads, dtype) for i in range(k.shape[0])]


class _Shadow(KVCache):
    """A second view of a row's cache for the padding row: reads its keys and values, and its
    writes land on the same slots with the same values (a harmless rewrite)."""

    def __init__(self, cache: KVCache) -> None:  # noqa: D107 (no KVCache.__init__: no copy)
        self.k, self.v, self.sizes = cache.k, cache.v, cache.sizes
        self.length, self.max_len = cache.length, cache.max_len
        self._pointers, self._tables = cache._pointers, None


def _after_attention(
    fast: FastGemma3, x: torch.Tensor, a: torch.Tensor, layer: _Layer, i: int, spans: Sequence[Span]
) -> torch.Tensor:
    """`FastGemma3._after_attention` with each row's own adapter."""
    o = _add_lora(layer.o(a), a, spans, i, "o", fast.native)
    x = x + fast.norm_rows(o, layer.ln_post_attn)
    h = fast.norm_rows(x, layer.ln_pre_ff)
    gu = _add_lora(layer.gu(h), h, spans, i, "gu", fast.native)
    m = _gelu_times(gu)
    d = _add_lora(layer.down(m), m, spans, i, "down", fast.native)
    return x + fast.norm_rows(d, layer.ln_post_ff)


def _add_lora(
    base: torch.Tensor,
    x: torch.Tensor,
    spans: Sequence[Span],
    i: int,
    group: str,
    native: NativeKernels | None,
) -> torch.Tensor:
    """Add each span's LoRA delta to its rows of `base` (a fresh matmul output: written in
    place), with the arithmetic of `_LoraGroup.add_to` on one row: an in-place add of the fp32
    delta into bf16 sums in fp32 and rounds once, as `(base + delta).to(bf16)` does."""
    if native is not None:
        work = [
            (lo, hi, lora.descs[i].get(group))
            for lo, hi, lora in spans
            if lora is not None and lora.descs is not None
        ]
        if any(d is not None for _, _, d in work):
            native.lora_add(base, x, work)
        spans = [s for s in spans if s[2] is not None and s[2].descs is None]  # torch's to do
    xf: torch.Tensor | None = None  # x in fp32, made once for all spans
    for lo, hi, lora in spans:
        g = lora.layers[i].get(group) if lora is not None else None
        if g is None:
            continue
        if xf is None:
            xf = x.float()
        u = _rows_matmul(xf[lo:hi], g.at)  # (m, r)
        if g.full:
            base[lo:hi].add_(_rows_matmul(u, g.parts[0][4]))  # (m, out)
            continue
        for c_lo, c_hi, r_lo, r_hi, bt in g.parts:
            base[lo:hi, c_lo:c_hi].add_(_rows_matmul(u[:, r_lo:r_hi], bt))
    return base


def _rows_matmul(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """(m, k) @ (k, n), each row rounded exactly as a 1-row `F.linear(x_row, wt.t())`."""
    m, k = x.shape
    if k * wt.shape[1] < _BMM_NAIVE_BELOW:
        return torch.cat([F.linear(x[j : j + 1], wt.t()) for j in range(m)])
    return torch.bmm(x.unsqueeze(1), wt.expand(m, -1, -1)).squeeze(1)
