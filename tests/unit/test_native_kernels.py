"""The C decode kernels against torch, each in its bf16 and its fp32 build. Attention: each row
on its own cache (ring slots, grouped query heads), within a rounding step of torch's result
(bf16's, or a few fp32 ones), the same bits alone as in any batch and with any thread count, and
the new keys and values written at their slots. LoRA: each run of rows with its own adapter
(fused groups of parts), within a step of torch's fp32 delta, the same bits alone as among other
adapters."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tunery.engine.gguf_blocks import Blocks
from tunery.engine.native import CacheTable, LoraDesc, NativeKernels

native = NativeKernels.load()
pytestmark = pytest.mark.skipif(native is None, reason="no C compiler on this machine")
SCALE = 0.0625
# Each kernel's builds, and how far from torch each may land (relative to the largest value): a
# bf16 rounding step, or sums in another order in fp32.
STEP = {torch.bfloat16: 2**-7, torch.float32: 2**-16}
each_dtype = pytest.mark.parametrize("dtype", list(STEP), ids=["bf16", "fp32"])


@contextmanager
def _threads(count: int) -> Iterator[None]:
    """torch's (and so the kernels') thread count set to `count` for the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rows(
    heads: int,
    groups: int,
    dim: int,
    sizes: list[int],
    positions: list[int],
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    n = len(sizes)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    return {
        "q": rand(n, heads, dim),
        "k": rand(n, groups * dim),
        "qkv": rand(n, 3 * groups * dim),  # v is a strided slice of it, as in the decode step
        "k_caches": [rand(groups, size, dim) for size in sizes],
        "v_caches": [rand(groups, size, dim) for size in sizes],
        "positions": torch.tensor(positions, dtype=torch.int64),
    }


def _attend(rows: dict, pick: list[int] | None = None) -> torch.Tensor:  # type: ignore[type-arg]
    """The kernel on copies of the caches (all rows, or the rows in `pick`)."""
    take = pick if pick is not None else list(range(rows["q"].shape[0]))
    groups_dim = rows["k"].shape[1]
    assert native is not None
    return native.attend(
        rows["q"][take],
        rows["k"][take],
        rows["qkv"][take][:, groups_dim : 2 * groups_dim],
        CacheTable.of(
            [rows["k_caches"][r].clone() for r in take],
            [rows["v_caches"][r].clone() for r in take],
        ),
        rows["positions"][take],
        SCALE,
    )


def _torch_attention(rows: dict, r: int) -> torch.Tensor:  # type: ignore[type-arg]
    """Row r by torch: the new key and value at their slot, SDPA over the filled slots."""
    k_cache, v_cache = rows["k_caches"][r].clone(), rows["v_caches"][r].clone()
    groups, size, dim = k_cache.shape
    pos = int(rows["positions"][r])
    slot, n = pos % size, min(pos + 1, size)
    k_cache[:, slot] = rows["k"][r].view(groups, dim)
    v_cache[:, slot] = rows["qkv"][r, groups * dim : 2 * groups * dim].view(groups, dim)
    q = rows["q"][r : r + 1].unsqueeze(2)  # (1, H, 1, D)
    a = F.scaled_dot_product_attention(
        q, k_cache[None, :, :n], v_cache[None, :, :n], scale=SCALE, enable_gqa=True
    )
    return a.reshape(-1)


@each_dtype
@pytest.mark.parametrize(("heads", "groups"), [(4, 1), (4, 2), (2, 2)])
def test_kernel_rows_agree_with_torch_attention_within_a_rounding_step(
    heads: int, groups: int, dtype: torch.dtype
) -> None:
    # A short row, one at the end of its cache, a ring that wrapped, a long full-attention row.
    rows = _rows(heads, groups, 256, [40, 40, 64, 700], [0, 39, 150, 600], dtype=dtype)
    out = _attend(rows)
    assert out.dtype == dtype
    for r in range(4):
        want = _torch_attention(rows, r).float()
        got = out[r].float()
        # Both sum in fp32 in their own order (in bf16 rounding the softmax weights and the
        # output): in bf16 the same bits mostly, and otherwise a step of the row's largest value.
        assert (got - want).abs().max() <= STEP[dtype] * want.abs().max(), r
        if dtype == torch.bfloat16:
            assert (got == want).float().mean() > 0.7, r


@each_dtype
def test_a_row_gets_the_same_bits_alone_as_in_any_batch_and_with_any_threads(
    dtype: torch.dtype,
) -> None:
    rows = _rows(4, 1, 256, [64, 300, 64, 300, 64], [5, 299, 64, 120, 200], dtype=dtype)
    together = _attend(rows)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = _attend(rows)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, serial)
    for r in range(5):
        assert torch.equal(_attend(rows, [r])[0], together[r]), r
    assert torch.equal(_attend(rows, [4, 1])[1], together[1])


@each_dtype
def test_the_new_key_and_value_land_in_their_slot_and_nothing_else_changes(
    dtype: torch.dtype,
) -> None:
    rows = _rows(4, 2, 64, sizes=[16, 100], positions=[37, 3], dtype=dtype)
    k_caches = [c.clone() for c in rows["k_caches"]]
    v_caches = [c.clone() for c in rows["v_caches"]]
    assert native is not None
    v = rows["qkv"][:, 128:256]
    table = CacheTable.of(k_caches, v_caches)
    native.attend(rows["q"], rows["k"], v, table, rows["positions"], SCALE)
    for r, slot in enumerate([37 % 16, 3]):
        want_k, want_v = rows["k_caches"][r].clone(), rows["v_caches"][r].clone()
        want_k[:, slot] = rows["k"][r].view(2, 64)
        want_v[:, slot] = v[r].view(2, 64)
        assert torch.equal(k_caches[r], want_k) and torch.equal(v_caches[r], want_v)


def _adapter(seed: int, d_in: int, widths: list[int], ranks: list[int]) -> LoraDesc:
    """A random fused-group LoRA: one part per (width, rank), A stacked over the parts."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(sum(ranks), d_in, generator=g) * 0.05
    parts, lo, r_lo = [], 0, 0
    for width, rank in zip(widths, ranks, strict=True):
        parts.append((lo, lo + width, r_lo, r_lo + rank, torch.randn(width, rank, generator=g)))
        lo, r_lo = lo + width, r_lo + rank
    desc = LoraDesc.of(a, parts)
    assert desc is not None
    return desc


def _torch_delta(desc: LoraDesc, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    a, *bs = desc._tensors
    u = x.float() @ a.float().t()
    out = base.float().clone()
    fields = desc._fields.tolist()
    for k, b in enumerate(bs):
        c_lo, c_hi, r_lo, r_hi = fields[4 + 5 * k : 8 + 5 * k]
        out[:, c_lo:c_hi] += u[:, r_lo:r_hi] @ b.t()
    return out


@each_dtype
def test_lora_rows_agree_with_torch_within_a_step_and_alone_as_among_others(
    dtype: torch.dtype,
) -> None:
    assert native is not None
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, 200, generator=g).to(dtype)
    base = torch.randn(10, 300, generator=g).to(dtype)
    # Rows 0-1 a three-part group, 2 none, 3-7 one part over every column (4 rows at a time,
    # then one), 8-9 part of the columns.
    three = _adapter(1, 200, [100, 50, 150], [8, 4, 16])
    full = _adapter(2, 200, [300], [16])
    some = _adapter(3, 200, [100], [5])
    spans = [(0, 2, three), (2, 3, None), (3, 8, full), (8, 10, some)]
    out = native.lora_add(base.clone(), x, spans)
    assert torch.equal(out[2], base[2])  # no adapter: untouched
    assert torch.equal(out[8:, 100:], base[8:, 100:])  # outside the adapter's part: untouched
    for lo, hi, desc in spans:
        if desc is None:
            continue
        want = _torch_delta(desc, x[lo:hi], base[lo:hi])
        assert (out[lo:hi].float() - want).abs().max() <= STEP[dtype] * want.abs().max()
        for r in range(lo, hi):  # alone: the same bits
            alone = native.lora_add(base[r : r + 1].clone(), x[r : r + 1], [(0, 1, desc)])
            assert torch.equal(alone[0], out[r]), r


@each_dtype
@pytest.mark.parametrize("rows", [1, 13, 45])
def test_lora_training_products_agree_with_torch(dtype: torch.dtype, rows: int) -> None:
    """A step's LoRA forward (u = x Aᵀ, y += s·u Bᵀ per part) and backward (A's and each B's
    gradient, the input's added into gx) against torch's fp32 products: the fp32 results to a
    few fp32 roundings, y and gx within a rounding step of their dtype."""
    assert native is not None
    g = torch.Generator().manual_seed(11)
    desc = _adapter(4, 64, [64, 32, 32], [16, 16, 32])
    assert native.lora_train_fits(desc, dtype)
    a, *bs = desc._tensors
    fields = desc._fields.tolist()
    bounds = [fields[4 + 5 * k : 8 + 5 * k] for k in range(len(bs))]
    x = torch.randn(rows, 64, generator=g).to(dtype)
    y0 = torch.randn(rows, 128, generator=g).to(dtype)
    grad_out = torch.randn(rows, 128, generator=g).to(dtype)
    s = 0.5

    y = y0.clone()
    u = native.lora_train_forward(y, x, desc, s)
    want_u = x.float() @ a.t()
    assert (u - want_u).abs().max() <= 1e-5 * want_u.abs().max()
    want_y = y0.float().clone()
    for (c_lo, c_hi, r_lo, r_hi), b in zip(bounds, bs, strict=True):
        want_y[:, c_lo:c_hi] += s * (want_u[:, r_lo:r_hi] @ b.t())
    assert (y.float() - want_y).abs().max() <= STEP[dtype] * want_y.abs().max()

    gx0 = torch.randn(rows, 64, generator=g).to(dtype)
    for gx in (gx0.clone(), None):
        grad_a, grad_bs = native.lora_train_backward(grad_out, x, u, desc, s, gx)
        gf = grad_out.float()
        parts = zip(bounds, bs, strict=True)
        gu = torch.cat([gf[:, c_lo:c_hi] @ b for (c_lo, c_hi, _, _), b in parts], 1)
        want_a = s * gu.t() @ x.float()
        assert (grad_a - want_a).abs().max() <= 1e-5 * want_a.abs().max()
        for (c_lo, c_hi, r_lo, r_hi), have in zip(bounds, grad_bs, strict=True):
            want_b = s * gf[:, c_lo:c_hi].t() @ u[:, r_lo:r_hi]
            assert have.shape == want_b.shape
            assert (have - want_b).abs().max() <= 1e-5 * want_b.abs().max()
        if gx is not None:
            want_gx = gx0.float() + s * gu @ a
            assert (gx.float() - want_gx).abs().max() <= STEP[dtype] * want_gx.abs().max()


def test_lora_training_kernels_take_no_rows_as_no_gradient() -> None:
    assert native is not None
    desc = _adapter(2, 64, [64], [16])
    x = torch.empty(0, 64).bfloat16()
    u = native.lora_train_forward(torch.empty(0, 64).bfloat16(), x, desc, 1.0)
    grad_a, (grad_b,) = native.lora_train_backward(x, x, u, desc, 1.0, None)
    assert u.shape == (0, 16) and not grad_a.any() and not grad_b.any()


def test_lora_training_kernels_refuse_ranks_and_widths_off_whole_vectors() -> None:
    assert native is not None
    assert not native.lora_train_fits(_adapter(1, 64, [64], [4]), torch.bfloat16)  # the rank
    assert not native.lora_train_fits(_adapter(1, 40, [64], [16]), torch.bfloat16)  # the input
    assert not native.lora_train_fits(_adapter(1, 64, [40], [16]), torch.bfloat16)  # a part
    assert not native.lora_train_fits(_adapter(1, 64, [64], [16]), torch.float16)


@each_dtype
def test_argmax_is_the_first_of_the_largest_values_as_torch_max_finds_it(
    dtype: torch.dtype,
) -> None:
    assert native is not None
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(5, 1003, generator=g).to(dtype)  # not a multiple of 16: a tail
    logits[1, 7] = logits[1, 900] = 50.0  # a tie: the first wins
    logits[2, 1001] = 60.0  # the best in the tail
    logits[3] = -5.0  # all equal
    logits[4, 20] = float("nan")  # torch's max returns the NaN
    assert native.argmax(logits) == logits.max(dim=-1).indices.tolist()
    assert native.argmax(logits)[:4] == [int(logits[0].float().argmax()), 7, 1001, 0]
    short = torch.tensor([[1.0, 3.0, 2.0]]).to(dtype)  # shorter than one vector
    assert native.argmax(short) == [1]


@each_dtype
def test_rms_norm_per_head_agrees_with_torch_within_a_step(dtype: torch.dtype) -> None:
    assert native is not None
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3 * 40, generator=g).to(dtype) * 3  # 3 heads of 40: a tail of 8
    weight = torch.rand(40, generator=g) + 0.5
    got = native.rms_norm(x, weight, 1e-6, heads=3).float().view(6, 3, 40)
    xf = x.float().view(6, 3, 40)
    want = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    assert ((got - want).abs() <= STEP[dtype] * want.abs() + 1e-6).all()
    strided = torch.cat([x, x], dim=1)[:, :120]  # rows further apart than their width
    assert torch.equal(
        native.rms_norm(strided, weight, 1e-6, heads=3), native.rms_norm(x, weight, 1e-6, heads=3)
    )
    assert torch.equal(
        native.rms_norm(x[2:3], weight, 1e-6, 3)[0], native.rms_norm(x, weight, 1e-6, 3)[2]
    )


@each_dtype
@pytest.mark.parametrize("per_head", [False, True], ids=["one-weight", "per-head-weights"])
def test_training_rms_norm_and_its_backward_agree_with_torch_autograd(
    dtype: torch.dtype, per_head: bool
) -> None:
    """Training's norm (q and k heads, each kind with its own weights, read from the fused qkv
    rows) and its input gradient equal the fp32 autograd of the same formula to the element
    type's rounding, with one thread and several; 2-D rows take one weight."""
    assert native is not None
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(7, 5 * 40 + 24, generator=g).to(dtype) * 3  # rows wider than 5 heads
    x = qkv[:, : 5 * 40].view(7, 5, 40)  # 5 heads of 40 (a tail of 8 past the vectors)
    weight = torch.rand((5, 40) if per_head else (40,), generator=g) + 0.5
    grad_out = torch.randn(7, 5, 40, generator=g).to(dtype)
    xf = x.float().requires_grad_()
    want = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    want.backward(grad_out.float())
    assert xf.grad is not None
    for threads in (1, 2):
        with _threads(threads):
            out = native.rms_norm_train(x, weight, 1e-6)
            assert out is not None
            y, rstd = out
            gx = native.rms_norm_backward(x, grad_out, weight, rstd)
        assert y.dtype == dtype and y.shape == x.shape and gx.shape == x.shape
        tolerance = STEP[dtype] * want.detach().abs() + 1e-6
        assert ((y.float() - want.detach()).abs() <= tolerance).all()
        torch.testing.assert_close(gx.float(), xf.grad, rtol=4 * STEP[dtype], atol=1e-4)
    flat = x[:, 0]  # 2-D rows: one head, one weight
    one = native.rms_norm_train(flat, weight[0] if per_head else weight, 1e-6)
    assert one is not None and torch.equal(one[0], y[:, 0])
    assert native.rms_norm_train(x, torch.rand(3, 40), 1e-6) is None  # weights for 3 heads
    assert native.rms_norm_train(x.transpose(0, 1), weight, 1e-6) is None  # heads apart


def test_without_a_working_compiler_the_kernels_are_off_and_decoding_uses_torch(
    tmp_path: Path,
) -> None:
    """A machine without a C compiler (here one that always fails) still decodes: `load()` is
    None, logged, and a fresh process's fast forward attends with torch."""
    script = (
        "import torch\n"
        "from tunery.engine.native import NativeKernels\n"
        "assert NativeKernels.load() is None\n"
        "print('torch only')\n"
    )
    for compiler, says in (
        ("/bin/false", "could not compile the native kernels"),
        (str(tmp_path / "no-such-cc"), "native kernels unavailable"),
    ):
        env = {**os.environ, "CC": compiler, "XDG_CACHE_HOME": str(tmp_path)}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "torch only"
        assert says in done.stderr


@each_dtype
def test_q_and_k_norm_and_rope_agree_with_torch_within_steps_and_alone_as_batched(
    dtype: torch.dtype,
) -> None:
    assert native is not None
    g = torch.Generator().manual_seed(6)
    rows, nh, nkv, hd = 5, 4, 2, 32
    qkv = torch.randn(rows, (nh + 2 * nkv) * hd, generator=g).to(dtype) * 2
    q_w, k_w = torch.rand(hd, generator=g) + 0.5, torch.rand(hd, generator=g) + 0.5
    angles = torch.arange(50).float()[:, None] * torch.rand(hd // 2, generator=g)[None]
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    positions = torch.tensor([0, 3, 49, 7, 20])
    q, k, _ = native.qk_norm_rope(qkv, (nh, nkv), (q_w, k_w), 1e-6, (cos, sin), positions)

    def torch_side(x: torch.Tensor, w: torch.Tensor, heads: int) -> torch.Tensor:
        xf = x.float().view(rows, heads, hd)
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * w).to(dtype).float()
        rotated = torch.cat([-y[..., hd // 2 :], y[..., : hd // 2]], dim=-1)
        c, s = cos[positions].float()[:, None], sin[positions].float()[:, None]
        return y * c + rotated * s

    for got, want in (
        (q.float(), torch_side(qkv[:, : nh * hd], q_w, nh)),
        (k.float().view(rows, nkv, hd), torch_side(qkv[:, nh * hd : (nh + nkv) * hd], k_w, nkv)),
    ):
        assert ((got - want).abs() <= STEP[dtype] * want.abs() + 1e-3).all()
    for r in range(rows):  # alone: the same bits
        q1, k1, _ = native.qk_norm_rope(
            qkv[r : r + 1], (nh, nkv), (q_w, k_w), 1e-6, (cos, sin), positions[r : r + 1]
        )
        assert torch.equal(q1[0], q[r]) and torch.equal(k1[0], k[r]), r


@each_dtype
@pytest.mark.parametrize("hd", [32, 40], ids=["halves-of-whole-vectors", "ragged-halves"])
def test_training_q_and_k_heads_are_the_decode_ones_head_major_and_their_backward_torchs(
    dtype: torch.dtype, hd: int
) -> None:
    """Training's q/k heads: the decode kernel's values laid out (heads, T, D) with each 1/rms
    kept; the backward within a rounding step of autograd through torch's norm and rotation
    (by whole vectors where a head's halves are, else value by value)."""
    assert native is not None
    g = torch.Generator().manual_seed(8)
    rows, nh, nkv = 7, 4, 2
    qkv = torch.randn(rows, (nh + 2 * nkv) * hd, generator=g).to(dtype) * 2
    weights = (torch.rand(hd, generator=g) + 0.5, torch.rand(hd, generator=g) + 0.5)
    angles = torch.arange(50).float()[:, None] * torch.rand(hd // 2, generator=g)[None]
    angles = torch.cat([angles, angles], dim=-1)
    tables = (angles.cos().to(dtype), angles.sin().to(dtype))
    positions = torch.tensor([0, 1, 2, 0, 1, 2, 3])
    q, k, rstd = native.qk_norm_rope(
        qkv, (nh, nkv), weights, 1e-6, tables, positions, training=True
    )
    assert rstd is not None
    q_dec, k_dec, _ = native.qk_norm_rope(qkv, (nh, nkv), weights, 1e-6, tables, positions)
    assert torch.equal(q, q_dec.transpose(0, 1)) and q.is_contiguous()
    assert torch.equal(k, k_dec.view(rows, nkv, hd).transpose(0, 1)) and k.is_contiguous()
    heads = qkv[:, : (nh + nkv) * hd].float().view(rows, nh + nkv, hd)
    want_rstd = torch.rsqrt(heads.pow(2).mean(-1) + 1e-6)
    assert torch.allclose(rstd, want_rstd, rtol=1e-5)

    gq = torch.randn(nh, rows, hd, generator=g).to(dtype)
    gk = torch.randn(nkv, rows, hd, generator=g).to(dtype)
    grad = torch.full((rows, (nh + 2 * nkv) * hd), 7.0, dtype=dtype)
    native.qk_heads_backward(qkv, (nh, nkv), weights, rstd, tables, positions, gq, gk, grad)
    assert (grad[:, (nh + nkv) * hd :] == 7).all()  # v's columns: not the kernel's

    x = heads.clone().requires_grad_()
    w = torch.cat([weights[0].expand(nh, hd), weights[1].expand(nkv, hd)])
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    c, s = tables[0].float()[positions][:, None], tables[1].float()[positions][:, None]
    rotated = torch.cat([-y[..., hd // 2 :], y[..., : hd // 2]], dim=-1)
    (y * c + rotated * s).backward(torch.cat((gq, gk)).float().transpose(0, 1))
    want = x.grad.reshape(rows, -1)
    have = grad[:, : (nh + nkv) * hd].float()
    assert (have - want).abs().max() <= 2 * STEP[dtype] * want.abs().max()


@each_dtype
@pytest.mark.parametrize("window", [None, 5])
def test_training_attention_agrees_with_torchs_forward_and_backward(
    dtype: torch.dtype, window: int | None
) -> None:
    """A packed step's attention (three examples, grouped query heads, with and without a
    window) against autograd through `fast_train._attend` and its mask: output and gradients
    within bf16's rounding (fp32: a few fp32 roundings)."""
    from tunery.engine.fast_train import _attend, _mask

    assert native is not None
    g = torch.Generator().manual_seed(12)
    heads, kv_heads, t, d = 4, 2, 23, 32
    q, k, v = (torch.randn(n, t, d, generator=g).to(dtype) for n in (heads, kv_heads, kv_heads))
    segments = torch.tensor([0] * 9 + [1] * 6 + [2] * 8)
    assert native.takes_attention(q, k, v)
    out, p = native.train_attention(q, k, v, segments, window, 0.125)
    grad_out = torch.randn(t, heads * d, generator=g).to(dtype)
    dq, dk, dv = native.train_attention_backward(q, k, v, segments, window, 0.125, p, grad_out)

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    mask = _mask(t, window, heads // kv_heads, q.device, segments)
    want = _attend(*leaves, mask, 0.125)
    want.backward(grad_out)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for have, ref in zip((out, dq, dk, dv), (want, *(x.grad for x in leaves)), strict=True):
        assert have.shape == ref.shape and have.dtype == dtype
        assert ((have.float() - ref.float()).norm() / ref.float().norm()) <= tolerance
    # no weight crosses an example or reaches ahead
    assert (p[:, 8, 9:] == 0).all() and (p[:, 9, :9] == 0).all()
    assert torch.allclose(p.sum(-1), torch.ones(heads, t))


def test_training_attention_refuses_what_its_kernel_does_not_lay_out() -> None:
    q = torch.randn(4, 5, 32)
    kv = torch.randn(2, 5, 32)
    assert NativeKernels.takes_attention(q, kv, kv)
    assert not NativeKernels.takes_attention(q, kv, kv.bfloat16())  # one dtype
    assert not NativeKernels.takes_attention(torch.randn(3, 5, 32), kv, kv)  # heads per kv head
    assert not NativeKernels.takes_attention(torch.randn(4, 5, 24), kv[..., :24], kv[..., :24])
    assert not NativeKernels.takes_attention(torch.randn(4, 32, 5).transpose(1, 2), kv, kv)


_TILES_ATTENTION = native is not None and native.attention_tiles


@pytest.mark.skipif(not _TILES_ATTENTION, reason="no AMX tiles on this CPU")
@pytest.mark.parametrize(
    ("lengths", "window", "heads", "d"),
    [
        ([9, 1, 40, 17], None, (4, 2), 32),  # one token, blocks of 16 and chunks of 32 crossed
        ([70, 33], 5, (4, 2), 64),  # a window shorter than a block
        ([300, 40], 64, (4, 1), 256),  # Gemma 3 270M's heads, a window over several blocks
    ],
)
def test_tiles_attention_agrees_with_autograd_per_example(
    lengths: list[int], window: int | None, heads: tuple[int, int], d: int
) -> None:
    """The AMX attention of a packed bf16 step (each example's queries on its own keys, the
    softmax weights made again in the backward from each row's log-sum-exp) against fp32
    autograd through `fast_train._attend` on each example alone: output and the three gradients
    within bf16's rounding."""
    from tunery.engine.fast_train import _attend, _mask

    assert native is not None
    g = torch.Generator().manual_seed(21)
    (h, kv), t = heads, sum(lengths)
    q, k, v = (torch.randn(n, t, d, generator=g).bfloat16() for n in (h, kv, kv))
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    assert native.takes_tiles_attention(q, k, v)
    done = native.tiles_attention(q, k, v, starts, window, 0.125)
    assert done is not None
    out, lse = done
    grad_out = torch.randn(t, h * d, generator=g).bfloat16()
    dq, dk, dv = native.tiles_attention_backward(q, k, v, starts, window, 0.125, lse, grad_out)

    leaves = [x.float().requires_grad_() for x in (q, k, v)]
    parts = []
    for lo, hi in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True):
        mask = _mask(hi - lo, window, h // kv, q.device)
        parts.append(_attend(*(x[:, lo:hi] for x in leaves), mask, 0.125))
    want = torch.cat(parts)
    want.backward(grad_out.float())
    for have, ref in zip((out, dq, dk, dv), (want, *(x.grad for x in leaves)), strict=True):
        assert have.shape == ref.shape and have.dtype == torch.bfloat16
        assert ((have.float() - ref).norm() / ref.norm()) <= 1e-2


@pytest.mark.skipif(not _TILES_ATTENTION, reason="no AMX tiles on this CPU")
def test_tiles_attention_gives_the_same_bits_with_any_thread_count() -> None:
    """Each block of queries (forward, dq) and of keys (dk, dv: the query heads summed in order)
    is one thread's task: a step's attention does not depend on how many threads share it."""
    assert native is not None
    g = torch.Generator().manual_seed(3)
    lengths = [70, 1, 33, 200]
    t = sum(lengths)
    q, k, v = (torch.randn(n, t, 64, generator=g).bfloat16() for n in (4, 2, 2))
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    grad_out = torch.randn(t, 4 * 64, generator=g).bfloat16()
    results = []
    for count in (1, 2, 3):
        with _threads(count):
            done = native.tiles_attention(q, k, v, starts, 50, 0.1)
            assert done is not None
            out, lse = done
            grads = native.tiles_attention_backward(q, k, v, starts, 50, 0.1, lse, grad_out)
        results.append((out, lse, *grads))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


@pytest.mark.skipif(not _TILES_ATTENTION, reason="no AMX tiles on this CPU")
def test_tiles_attention_refuses_what_it_does_not_lay_out() -> None:
    assert native is not None
    q, kv = torch.randn(4, 5, 32).bfloat16(), torch.randn(2, 5, 32).bfloat16()
    assert native.takes_tiles_attention(q, kv, kv)
    assert not native.takes_tiles_attention(q.float(), kv.float(), kv.float())  # bf16 only
    q16, kv16 = q[..., :16].contiguous(), kv[..., :16].contiguous()
    assert not native.takes_tiles_attention(q16, kv16, kv16)  # D a multiple of 32
    # bounds that do not cover the row: no result, not a wrong one
    assert native.tiles_attention(q, kv, kv, torch.tensor([0, 3]), None, 0.125) is None


@each_dtype
def test_fused_residual_and_norm_give_the_separate_kernels_bits(dtype: torch.dtype) -> None:
    """`add_norm_train` and its backward: the bits of the two norms' kernels and torch's adds."""
    assert native is not None
    g = torch.Generator().manual_seed(13)
    rows, n = 9, 96
    x, y, g_s, g_h = (torch.randn(rows, n, generator=g).to(dtype) for _ in range(4))
    w_out, w_next = torch.rand(n, generator=g) + 0.5, torch.rand(n, generator=g) + 0.5
    fused = native.add_norm_train(x, y, w_out, w_next, 1e-6)
    assert fused is not None
    s, h, rstd_y, rstd_s = fused
    normed, want_rstd_y = native.rms_norm_train(y, w_out, 1e-6)  # type: ignore[misc]
    want_s = x + normed
    want_h, want_rstd_s = native.rms_norm_train(want_s, w_next, 1e-6)  # type: ignore[misc]
    assert torch.equal(s, want_s) and torch.equal(h, want_h)
    assert torch.equal(rstd_y, want_rstd_y.view(-1)) and torch.equal(rstd_s, want_rstd_s.view(-1))

    grad_x, grad_y = native.add_norm_backward(y, s, (w_out, w_next), (rstd_y, rstd_s), g_s, g_h)
    want_x = g_s + native.rms_norm_backward(s, g_h, w_next, want_rstd_s)
    assert torch.equal(grad_x, want_x)
    assert torch.equal(grad_y, native.rms_norm_backward(y, want_x, w_out, want_rstd_y))
    assert native.add_norm_train(x, y[:, :48], w_out, w_next, 1e-6) is None  # shapes differ


def _head(vocab: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 head (vocab, dim) with an outlier column and a repeated row (an exact tie), and
    rows of hidden states, one with a large outlier as Gemma's final states have."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(vocab, dim, generator=g) * 0.05).bfloat16()
    w[:, 3] *= 8
    w[7] *= 4  # the longest row: h = w[7] picks it
    w[vocab - 5] = w[7]  # equal logits everywhere: the first (7) must win
    h = torch.randn(40, dim, generator=g)
    h[1, 11] = 60.0
    h[2] = w[7].float() * 40  # its best token is 7 (and vocab - 5, tied)
    return w, h.bfloat16()


@pytest.mark.parametrize(("vocab", "dim"), [(1000, 64), (4099, 128)])
def test_packed_head_picks_the_bf16_rounded_exact_argmax_alone_batched_and_any_threads(
    vocab: int, dim: int
) -> None:
    assert native is not None
    w, h = _head(vocab, dim)
    head = native.pack_head(w)
    if head is None:
        pytest.skip("no AVX512-VNNI or AVX2 on this CPU")
    # fp32 logits rounded to bf16: each row's first largest is the answer
    exact = (h.float() @ w.float().T).bfloat16().float()
    want = [int(row.eq(row.max()).nonzero()[0]) for row in exact]
    assert want[2] == 7
    assert native.best_tokens(h, head) == want  # 40 rows: 8-row tiles and single rows
    for r in (0, 1, 2, 39):
        assert native.best_tokens(h[r : r + 1], head) == [want[r]]
    torch.set_num_threads(1)
    try:
        assert native.best_tokens(h[:9], head) == want[:9]
    finally:
        torch.set_num_threads(os.cpu_count() or 1)


@pytest.mark.parametrize(("vocab", "dim"), [(1000, 64), (4099, 640)])
def test_packed_fp32_head_picks_the_exact_argmax_alone_and_batched(vocab: int, dim: int) -> None:
    """fp32 weights (a CPU without AVX512-BF16 decodes in fp32): the largest fp32 logit, the
    first of equal ones; compared in float64, as two fp32 sums of another order may differ in
    the last bit."""
    assert native is not None
    w, h = _head(vocab, dim)
    w, h = w.float(), h.float()
    head = native.pack_head(w)
    if head is None:
        pytest.skip("no AVX512-VNNI or AVX2 on this CPU")
    exact = h.double() @ w.double().T
    best = native.best_tokens(h, head)
    assert best[2] == 7  # the tie with vocab - 5: the first
    for r, token in enumerate(best):
        top = exact[r].max()
        assert exact[r, token] >= top - 1e-5 * top.abs(), r
        assert exact[r, :token].max() < exact[r, token] if token else True, r
    assert [native.best_tokens(h[r : r + 1], head)[0] for r in range(5)] == best[:5]
    with pytest.raises(ValueError, match="float32"):
        native.best_tokens(h.bfloat16(), head)


@pytest.mark.parametrize(("vocab", "dim"), [(1000, 64), (4099, 640)])
def test_top_logits_are_each_rows_k_largest_alone_batched_and_any_threads(
    vocab: int, dim: int
) -> None:
    """A top-k sampler's inputs without the (rows, vocab) logits: each row's k largest logits
    rounded to bf16, largest first, the first of equal ones first (the tie of 7 and vocab - 5),
    the same bits for a row alone, in a batch, with one thread, and as the first j of a larger
    k. fp32 sums of another order than torch's: equal to its logits up to their rounding."""
    assert native is not None
    w, h = _head(vocab, dim)
    k = 40
    top = native.top_logits(h, w, k)
    if top is None:
        pytest.skip("no AMX tiles on this CPU")
    values, tokens = top
    assert values.shape == tokens.shape == (40, k)
    exact = h.double() @ w.double().T
    for r in range(40):
        got = exact[r, tokens[r]]
        assert torch.allclose(values[r].double(), got, rtol=2**-7, atol=1e-6), r
        assert values[r].bfloat16().float().equal(values[r]), r  # rounded to bf16
        assert bool((values[r][:-1] >= values[r][1:]).all()), r  # largest first
        kth = float(exact[r].sort(descending=True).values[k - 1])
        assert float(got.min()) >= kth - 2**-6 * abs(kth), r  # no larger logit left out
    assert tokens[2, :2].tolist() == [7, vocab - 5]
    for r in (0, 1, 2, 17, 39):
        alone = native.top_logits(h[r : r + 1], w, k)
        assert alone is not None
        assert torch.equal(alone[0][0], values[r]) and torch.equal(alone[1][0], tokens[r]), r
    small = native.top_logits(h[:9], w, 5)
    assert small is not None
    assert torch.equal(small[1], tokens[:9, :5]) and torch.equal(small[0], values[:9, :5])
    torch.set_num_threads(1)
    try:
        one = native.top_logits(h[:33], w, k)
        assert one is not None
        assert torch.equal(one[1], tokens[:33]) and torch.equal(one[0], values[:33])
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    h[3, 0] = float("nan")
    nan = native.top_logits(h[:5], w, 3)
    assert nan is not None and nan[1][3, 0] == -1 and bool((nan[1][[0, 1, 2, 4], 0] >= 0).all())
    assert native.top_logits(h.float(), w.float(), k) is None  # bf16 only
    with pytest.raises(ValueError, match="k must be"):
        native.top_logits(h[:2], w, vocab + 1)


def test_packed_head_marks_a_row_that_is_not_finite_for_the_caller() -> None:
    assert native is not None
    w, h = _head(1000, 64)
    head = native.pack_head(w)
    if head is None:
        pytest.skip("no AVX512-VNNI or AVX2 on this CPU")
    h[3, 0] = float("nan")
    h[5, 1] = float("inf")
    best = native.best_tokens(h[:8], head)
    assert best[3] == best[5] == -1 and all(t >= 0 for j, t in enumerate(best) if j not in (3, 5))


def test_mixed_dtypes_are_refused_not_read_as_one_type() -> None:
    assert native is not None
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="all bf16 or all fp32"):
        native.lora_add(torch.zeros(2, 8).bfloat16(), x, [])
    with pytest.raises(ValueError, match="all bf16 or all fp32"):
        native.rms_norm(x.half(), torch.ones(64), 1e-6)
    rows = _rows(4, 1, 64, sizes=[16], positions=[0], dtype=torch.float32)
    bf16_caches = CacheTable.of([rows["k_caches"][0].bfloat16()], [rows["v_caches"][0].bfloat16()])
    with pytest.raises(ValueError, match="all bf16 or all fp32"):
        native.attend(
            rows["q"], rows["k"], rows["qkv"][:, 64:128], bf16_caches, rows["positions"], SCALE
        )


def _assert_rows_get_their_bits(
    linear: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> None:
    """`linear` gives each row of x the bits it gives it among all of them: alone, among a few,
    in 4-row groups and not, and with one thread."""
    batched = linear(x)
    for rows in ([0], [3, 4], [5, 6, 7, 8, 9], list(range(4))):
        assert torch.equal(linear(x[rows]), batched[rows]), rows
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(linear(x), batched)
    finally:
        torch.set_num_threads(threads)


def test_bf16_weight_linear_matches_fp32_math_and_a_row_gets_its_bits_in_any_batch() -> None:
    assert native is not None
    g = torch.Generator().manual_seed(11)
    # 7 outputs (one partial panel) and 100 inputs; 64 outputs (whole and partial panels)
    for n_out, n_in in ((7, 100), (64, 640)):
        weight = torch.randn(n_out, n_in, generator=g).bfloat16()
        packed = native.narrow_linear(weight.float())
        assert packed is not None
        x = torch.randn(32, n_in, generator=g)
        batched = native.linear_bf16w(x, packed)
        want = x.double() @ weight.double().t()
        assert (batched.double() - want).abs().max() <= 1e-5 * want.abs().max()
        _assert_rows_get_their_bits(lambda rows, w=packed: native.linear_bf16w(rows, w), x)
    with pytest.raises(ValueError, match="columns"):
        native.linear_bf16w(x[:, :10], packed)


def test_int8_weight_linear_is_the_scaled_int8_product_and_a_row_gets_its_bits_in_any_batch() -> (
    None
):
    assert native is not None
    g = torch.Generator().manual_seed(12)
    # one partial panel; whole and partial panels; more inputs than a decode step's widest
    for n_out, n_in in ((7, 100), (64, 640), (50, 2048)):
        q = torch.randint(-127, 128, (n_out, n_in), generator=g, dtype=torch.int8)
        scale = torch.rand(n_out, generator=g) * 0.01
        weight = native.int8_linear(q, scale)
        x = torch.randn(32, n_in, generator=g) * 3
        batched = native.linear_i8w(x, weight)
        want = (x.double() @ q.double().t()) * scale.double()
        assert batched.shape == (32, n_out)
        assert (batched.double() - want).abs().max() <= 1e-5 * want.abs().max()
        _assert_rows_get_their_bits(lambda rows, w=weight: native.linear_i8w(rows, w), x)
    with pytest.raises(ValueError, match="columns"):
        native.linear_i8w(x[:, :10], weight)
    with pytest.raises(ValueError, match="int8 weight"):
        native.int8_linear(q.float(), scale)


@pytest.mark.parametrize("shape", [(7, 100), (50, 33), (64, 640)])
def test_fp32_weights_of_bf16_values_narrow_to_the_bf16_panels_and_others_do_not(
    shape: tuple[int, int],
) -> None:
    assert native is not None
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(5)).bfloat16()
    narrowed = native.narrow_linear(weight.float())
    assert narrowed is not None and (narrowed.n_out, narrowed.n_in) == shape
    # panel p holds outputs [p·P, (p+1)·P) k-major, zero-padded: panels[p][k][c] = W[p·P + c][k]
    n_out, n_in = shape
    width = native.linear_panel
    padded = torch.zeros(-(-n_out // width) * width, n_in, dtype=torch.bfloat16)
    padded[:n_out] = weight
    want = padded.view(-1, width, n_in).transpose(1, 2).reshape(-1)
    assert torch.equal(narrowed.panels, want)
    transposed = native.narrow_linear(weight.t().contiguous().float().t())  # read through strides
    assert transposed is not None and torch.equal(transposed.panels, narrowed.panels)
    inexact = weight.float()
    inexact[shape[0] - 1, shape[1] - 1] += 2.0**-20  # one value off bf16, in the last panel
    assert native.narrow_linear(inexact) is None
    with pytest.raises(ValueError, match="fp32 weight"):
        native.narrow_linear(weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(
    ("vocab", "dim", "rows"),
    [
        (1000, 128, 1),
        (4099, 128, 13),
        (50, 640, 7),
        (4099, 128, 40),
        (300, 640, 64),
        (300, 128, 65),
        (300, 128, 200),  # tiles: groups of 16 rows in pairs, 13 groups
    ],
)
def test_fused_head_loss_is_cross_entropy_and_its_gradient(
    dtype: torch.dtype, vocab: int, dim: int, rows: int
) -> None:
    """Each row's loss and input gradient over the vocab head in one pass (an online softmax by
    blocks of vocab rows, shared among threads) equal torch's cross-entropy and autograd to fp32
    rounding, for vocab sizes that are not whole blocks or tiles, with one thread and several;
    for a bf16 head on AMX tiles (groups of 16 rows), of the rows rounded to bf16, and with the
    same bits for a head whose rows do not start on 64-byte lines (read from an aligned copy)."""
    assert native is not None
    g = torch.Generator().manual_seed(vocab)
    weight = (torch.randn(vocab, dim, generator=g) * 0.1).to(dtype)
    hidden = torch.randn(rows, dim, generator=g) * 4
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[0] = vocab - 1  # the last, partial block
    tiles = dtype == torch.bfloat16 and rows <= native.head_loss_tile_rows
    h = (hidden.bfloat16().float() if tiles else hidden).clone().requires_grad_()
    want = F.cross_entropy(h @ weight.float().t(), labels, reduction="none")
    want.sum().backward()
    assert h.grad is not None
    for threads in (1, 2, 3):
        with _threads(threads):
            got = native.head_loss(hidden, weight, labels, grad=True)
            loss_only = native.head_loss(hidden, weight, labels, grad=False)
        assert got is not None and got[1] is not None and loss_only is not None
        torch.testing.assert_close(got[0], want.detach(), rtol=1e-5, atol=1e-5)
        # on tiles, a block whose softmax keeps many terms sums them as bf16 (each off by at most
        # 2^-9 of itself): the gradient by at most 2^-9 x the largest weight, here 2^-8
        bound = 2.0**-8 * float(weight.float().abs().max()) if tiles else 1e-5
        torch.testing.assert_close(got[1], h.grad, rtol=1e-5, atol=bound)
        assert loss_only[1] is None and torch.equal(loss_only[0], got[0])
        if tiles:
            storage = torch.empty(vocab * dim + 8, dtype=dtype)
            shifted = storage[8:].view(vocab, dim)  # 16 bytes past a line
            shifted.copy_(weight)
            with _threads(threads):
                moved = native.head_loss(hidden, shifted, labels, grad=True)
            assert moved is not None and moved[1] is not None
            assert torch.equal(moved[0], got[0]) and torch.equal(moved[1], got[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fused_head_loss_leaves_out_of_the_gradient_only_terms_below_the_bound(
    dtype: torch.dtype,
) -> None:
    """With a skipped mass, the gradient leaves out softmax terms below mass / V: its error per
    row stays under mass x the largest row norm of the weight, the loss stays exact."""
    assert native is not None
    g = torch.Generator().manual_seed(7)
    vocab, dim, rows = 4099, 128, 9
    weight = (torch.randn(vocab, dim, generator=g) * 0.1).to(dtype)
    hidden = torch.randn(rows, dim, generator=g) * 12  # logits spread over ~30 nats: peaked
    labels = torch.randint(0, vocab, (rows,), generator=g)
    exact = native.head_loss(hidden, weight, labels, grad=True)
    assert exact is not None and exact[1] is not None
    for mass in (1e-3, 0.5):
        got = native.head_loss(hidden, weight, labels, grad=True, skipped_mass=mass)
        assert got is not None and got[1] is not None
        torch.testing.assert_close(got[0], exact[0], rtol=1e-6, atol=1e-6)
        error = (got[1] - exact[1]).norm(dim=1)
        assert error.max() <= mass * weight.float().norm(dim=1).max()
        if mass == 0.5:
            assert not torch.equal(got[1], exact[1])  # terms were left out


def test_fused_head_loss_refuses_labels_outside_the_vocab_and_declines_odd_widths() -> None:
    assert native is not None
    weight, hidden = torch.randn(100, 128), torch.randn(2, 128)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        native.head_loss(hidden, weight, torch.tensor([3, 100]), grad=True)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        native.head_loss(hidden, weight, torch.tensor([-1, 0]), grad=False)
    odd = native.head_loss(torch.randn(2, 40), torch.randn(100, 40), torch.tensor([1, 2]), True)
    assert odd is None  # a width the tiles do not divide: the caller's matmuls take it


@each_dtype
@pytest.mark.parametrize(("rows", "vocab"), [(1, 7), (5, 1000), (3, 4099)])
def test_softmax_xent_turns_logits_into_their_gradient_and_gives_each_rows_loss(
    dtype: torch.dtype, rows: int, vocab: int
) -> None:
    """In place, each row of logits becomes softmax - onehot(label) within a rounding step of
    torch's, and its loss is torch's cross-entropy from the same logits, for vocab sizes that are
    not whole vectors, with one thread and several; a label outside the vocabulary is refused."""
    assert native is not None
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(rows, vocab, generator=g) * 6).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[0] = vocab - 1  # in the row's tail, past its last whole vector
    z = logits.float().requires_grad_()
    want = F.cross_entropy(z, labels, reduction="sum")
    want.backward()
    assert z.grad is not None
    for threads in (1, 2, 3):
        got = logits.clone()
        with _threads(threads):
            losses = native.softmax_xent(got, labels)
        assert losses is not None and losses.shape == (rows,)
        torch.testing.assert_close(losses.sum(), want.detach(), rtol=1e-5, atol=1e-5)
        assert (got.float() - z.grad).abs().max() <= STEP[dtype]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        native.softmax_xent(logits.clone(), torch.full((rows,), vocab))
    assert native.softmax_xent(logits[:, ::2], labels // 2) is None  # not contiguous


@each_dtype
@pytest.mark.parametrize("rows", [1, 9])
def test_gelu_times_and_its_gradient_agree_with_torch_autograd(
    dtype: torch.dtype, rows: int
) -> None:
    """Training's gelu-tanh(gate) · up over a fused gate/up output, and its gradient for both
    halves, within a rounding step of torch's ops (a width that is not whole vectors too)."""
    assert native is not None
    g = torch.Generator().manual_seed(rows)
    for width in (2 * 64, 2 * 37):
        gu = (torch.randn(rows, width, generator=g) * 3).to(dtype)
        grad_out = torch.randn(rows, width // 2, generator=g).to(dtype)
        x = gu.float().requires_grad_()
        gate, up = x.chunk(2, dim=-1)
        want = F.gelu(gate, approximate="tanh") * up
        want.backward(grad_out.float())
        assert x.grad is not None
        got = native.gelu_times(gu)
        assert got is not None
        assert (got.float() - want).abs().max() <= STEP[dtype] * want.abs().max()
        back = native.gelu_times_backward(gu, grad_out)
        assert back.shape == gu.shape and back.dtype == dtype
        assert (back.float() - x.grad).abs().max() <= STEP[dtype] * x.grad.abs().max()
    if rows > 1:
        assert native.gelu_times(gu[:, 2:]) is None  # rows that are not contiguous


@pytest.mark.skipif(native is None or not native.tiles, reason="no AMX tiles on this CPU")
def test_tiles_linear_gives_each_row_the_same_bits_in_any_batch() -> None:
    """`tiles_linear` (AMX tiles) is x Wᵀ summed in fp32 and rounded to bf16 once, for 1 to
    `TILES_MAX_ROWS` rows (output tiles in pairs and an odd one, row groups two a pass), and a
    row's bits do not depend on the rows around it or the thread count; more rows, or odd
    shapes, are declined."""
    assert native is not None
    g = torch.Generator().manual_seed(5)
    weight = (torch.randn(80, 96, generator=g) * 0.1).bfloat16()  # 5 output tiles, 3 chunks
    tiled = native.tiles_pack(weight)
    assert tiled is not None
    most = native.TILES_MAX_ROWS
    x = torch.randn(most, 96, generator=g).bfloat16()
    whole = native.tiles_linear(x, tiled)
    assert whole is not None and whole.dtype == torch.bfloat16
    want = (x.float() @ weight.float().t()).bfloat16()
    assert ((whole.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-6).all()
    for rows in (1, 2, 17, 33, 50, 64, 65, 300):
        for threads in (1, 2):
            with _threads(threads):
                part = native.tiles_linear(x[most - rows :], tiled)
            assert part is not None and torch.equal(part, whole[most - rows :])
    assert native.tiles_linear(torch.zeros(most + 1, 96).bfloat16(), tiled) is None
    assert native.tiles_pack(torch.zeros(80, 100).bfloat16()) is None  # inputs not a multiple of 32
    assert native.tiles_pack(torch.zeros(40, 96).bfloat16()) is None  # outputs not of 16


@pytest.mark.skipif(native is None or not native.tiles, reason="no AMX tiles on this CPU")
def test_tiles_gemm_gives_each_row_the_bits_of_tiles_linear() -> None:
    """`tiles_gemm` (a training step's many rows, W kept in cache a block at a time, each pair's
    sums rounded while the next pair's run) gives each row exactly `tiles_linear`'s bits, for
    row counts with and without a partial last pair, W blocks of one and several output tile
    pairs, and any thread count; above `tiles_linear`'s most rows too."""
    assert native is not None
    g = torch.Generator().manual_seed(9)
    for out, n_in in ((64, 96), (96, 8192)):  # 2 tile pairs in a W block; 3 in 2 blocks
        weight = (torch.randn(out, n_in, generator=g) * 0.05).bfloat16()
        packed = native.gemm_pack(weight)
        assert packed is not None
        x = torch.randn(1100, n_in, generator=g).bfloat16()
        whole = native.tiles_gemm(x, packed)
        assert whole is not None and whole.shape == (1100, out)
        want = (x.float() @ weight.float().t()).bfloat16()
        assert ((whole.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-5).all()
        linear = native.tiles_linear(x[:1000], packed)
        assert linear is not None and torch.equal(linear, whole[:1000])
        for rows in (1, 15, 32, 33, 70, 1100):
            for threads in (1, 2, 3):
                with _threads(threads):
                    part = native.tiles_gemm(x[1100 - rows :], packed)
                assert part is not None and torch.equal(part, whole[1100 - rows :])
    assert native.gemm_pack(torch.zeros(80, 96).bfloat16()) is None  # 5 output tiles: odd
    assert native.tiles_gemm(torch.zeros(4, 8192), packed) is None  # fp32 rows


@pytest.mark.skipif(native is None or not native.tiles, reason="no AMX tiles on this CPU")
def test_tiles_gemm_with_a_second_product_gives_the_bits_of_one_over_both_inputs() -> None:
    """x Wᵀ + x2 W2ᵀ in `tiles_gemm`'s sums (a LoRA's delta: x2 = u, W2 = s·B) gives exactly the
    bits of one product over x and x2 side by side, for partial last pairs and 1-3 threads; a
    second product of another output count or row count is refused."""
    assert native is not None
    g = torch.Generator().manual_seed(12)
    out, n_in, n_in2 = 64, 640, 32
    weight = (torch.randn(out, n_in, generator=g) * 0.05).bfloat16()
    weight2 = (torch.randn(out, n_in2, generator=g) * 0.05).bfloat16()
    both = native.gemm_pack(torch.cat([weight, weight2], dim=1))
    packed, packed2 = native.gemm_pack(weight), native.gemm_pack(weight2)
    assert both is not None and packed is not None and packed2 is not None
    for rows in (1, 33, 300):
        x = torch.randn(rows, n_in, generator=g).bfloat16()
        x2 = torch.randn(rows, n_in2, generator=g).bfloat16()
        want = native.tiles_gemm(torch.cat([x, x2], dim=1), both)
        for threads in (1, 2, 3):
            with _threads(threads):
                got = native.tiles_gemm(x, packed, (x2, packed2))
            assert got is not None and want is not None and torch.equal(got, want), rows
    x = torch.zeros(8, n_in).bfloat16()
    other = native.gemm_pack(torch.zeros(32, n_in2).bfloat16())
    assert (
        other is not None
        and native.tiles_gemm(x, packed, (torch.zeros(8, 32).bfloat16(), other)) is None
    )
    assert native.tiles_gemm(x, packed, (torch.zeros(9, 32).bfloat16(), packed2)) is None


@pytest.mark.skipif(native is None or not native.tiles, reason="no AMX tiles on this CPU")
def test_lora_tn_sums_u_transposed_times_g_over_every_row_with_the_same_bits_on_any_threads() -> (
    None
):
    """`lora_tn` (a LoRA weight's gradient, scale · uᵀ g summed over a step's rows) matches an
    fp64 product to fp32 rounding, for rows that fill no chunk, several, and a partial last one,
    u and g read as column slices of wider rows, ranks 16 and 32, a row block boundary crossed;
    with the same bits on 1-3 threads; none rows give zeros; shapes it does not take give None."""
    assert native is not None
    g = torch.Generator().manual_seed(11)
    for n, r, m, wide in ((1, 16, 32, 64), (45, 32, 640, 640), (300, 16, 2048, 4096)):
        u_rows = torch.randn(n + 1, 48, generator=g).bfloat16()
        g_rows = torch.randn(n + 1, wide, generator=g).bfloat16()
        u_rows[n], g_rows[n] = float("nan"), float("nan")  # past the rows: never read
        u, grad = u_rows[:n, 16 : 16 + r], g_rows[:n, wide - m :]  # strided views
        got = native.lora_tn(u, grad, 0.25)
        assert got is not None and got.shape == (r, m) and got.dtype == torch.float32
        want = (u.double().t() @ grad.double() * 0.25).float()
        assert ((got - want).abs() <= want.abs() * 1e-5 + 1e-4).all(), (n, r, m)
        for threads in (1, 2, 3):
            with _threads(threads):
                assert torch.equal(native.lora_tn(u, grad, 0.25), got)
                flipped = native.lora_tn(u, grad, 0.25, transposed=True)
                assert flipped is not None and flipped.shape == (m, r)
                assert flipped.is_contiguous() and torch.equal(flipped, got.t())
    empty = native.lora_tn(torch.zeros(0, 16).bfloat16(), torch.zeros(0, 64).bfloat16(), 1.0)
    assert empty is not None and torch.equal(empty, torch.zeros(16, 64))
    some = torch.ones(40, 64).bfloat16()
    assert native.lora_tn(some[:, :8], some, 1.0) is None  # rank 8
    assert native.lora_tn(some[:, :16], some[:, :48], 1.0) is None  # 48 columns
    assert native.lora_tn(some[:, :16].float(), some, 1.0) is None  # fp32


@pytest.mark.skipif(native is None or not native.tiles, reason="no AMX tiles on this CPU")
@pytest.mark.parametrize("block, offsets", [(32, False), (16, False), (32, True)])
def test_tiles_on_gguf_blocks_give_the_bits_of_the_bf16_weight_they_make(
    block: int, offsets: bool
) -> None:
    """`tiles_linear` on a weight's GGUF blocks (codes, a scale per 16 or 32 inputs, offsets)
    gives, for any number of rows and threads, exactly what it gives on the bf16 weight the
    blocks make (`Blocks.dequantized`, rounded): the kernel makes each tile back into those
    bf16 values."""
    assert native is not None
    g = torch.Generator().manual_seed(7)
    out, n_in = 80, 96
    codes = torch.randint(-32, 32, (out, n_in), generator=g, dtype=torch.int8)
    scale = torch.rand(out, n_in // block, generator=g) * 0.01 + 1e-4
    offset = torch.rand(out, n_in // block, generator=g) * 0.01 if offsets else None
    blocks = Blocks(codes, scale, offset, block)
    weight = blocks.dequantized().bfloat16()
    assert blocks.matches(weight) and not blocks.matches(weight * 2)
    packed, plain = native.blocks_pack(blocks), native.tiles_pack(weight)
    assert packed is not None and plain is not None
    x = torch.randn(70, n_in, generator=g).bfloat16()
    for rows in (1, 5, 16, 33, 70):
        for threads in (1, 2):
            with _threads(threads):
                got = native.tiles_linear(x[:rows], packed)
                want = native.tiles_linear(x[:rows], plain)
            assert got is not None and want is not None
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    odd = Blocks(codes[:40], scale[:40], None if offset is None else offset[:40], block)
    assert native.blocks_pack(odd) is None  # outputs not a multiple of 16


@pytest.mark.skipif(native is None or not native.tiles, reason="no AMX tiles on this CPU")
def test_top_logits_of_a_head_as_gguf_blocks_are_those_of_its_bf16_values() -> None:
    """A head packed as Q8_0-like blocks (a scale per 32 inputs) gives each row the very k
    values and tokens the bf16 head of the blocks' values gives, alone or batched, with ties
    (equal vocab rows) kept in token order."""
    assert native is not None
    g = torch.Generator().manual_seed(11)
    vocab, dim = 4096 + 48, 640  # an odd tile pair at the end
    codes = torch.randint(-127, 128, (vocab, dim), generator=g, dtype=torch.int8)
    codes[vocab - 5] = codes[7]  # a tie: the same logits for two tokens
    scale = torch.rand(vocab, dim // 32, generator=g) * 1e-3 + 1e-4
    scale[vocab - 5] = scale[7]
    blocks = Blocks(codes, scale, None, 32)
    weight = blocks.dequantized().bfloat16()
    packed = native.blocks_pack(blocks)
    assert packed is not None
    h = torch.randn(37, dim, generator=g).bfloat16()
    h[2] = weight[7].float().bfloat16()  # row 2's best: the tie
    for rows in (h, h[5:6], h[:17]):
        for k in (1, 40):
            got, want = native.top_logits(rows, packed, k), native.top_logits(rows, weight, k)
            assert got is not None and want is not None
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (rows.shape, k)
    top = native.top_logits(h[:3], packed, 2)
    assert top is not None and top[1][2].tolist() == [7, vocab - 5]


@pytest.mark.skipif(native is None or not native.tiles, reason="no AMX tiles on this CPU")
def test_the_decode_steps_gelu_gives_torchs_bits() -> None:
    """The whole decode step's gelu-tanh(gate) · up is torch's `F.gelu(gate) * up` in bf16 bit
    for bit (torch's op order and its own tanh), over gates of every magnitude, on 1-3 threads;
    with AMX tiles here, the step runs (torch's tanh found and checked at load)."""
    assert native is not None and native.steps
    g = torch.Generator().manual_seed(11)
    gu = (torch.randn(7, 2 * 2048, generator=g) * torch.logspace(-3, 2, 2 * 2048)).bfloat16()
    gate, up = gu.chunk(2, dim=-1)
    want = F.gelu(gate, approximate="tanh") * up
    for threads in (1, 2, 3):
        with _threads(threads):
            assert torch.equal(
                native.gelu_times_torch(gu).view(torch.int16), want.view(torch.int16)
            )
    with pytest.raises(ValueError):
        native.gelu_times_torch(gu[:, :40])  # f = 20: not whole vectors
