"""The C decode-attention kernel against torch's attention: each row on its own cache (ring
slots, grouped query heads), within a bf16 step of torch's result, the same bits alone as in any
batch and with any thread count, and the new keys and values written at their slots."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunery.engine.native import NativeAttention

native = NativeAttention.load()
pytestmark = pytest.mark.skipif(native is None, reason="no C compiler on this machine")
SCALE = 0.0625


def _rows(
    heads: int, groups: int, dim: int, sizes: list[int], positions: list[int], seed: int = 0
) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    n = len(sizes)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).bfloat16()

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
        [rows["k_caches"][r].clone() for r in take],
        [rows["v_caches"][r].clone() for r in take],
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


@pytest.mark.parametrize(("heads", "groups"), [(4, 1), (4, 2), (2, 2)])
def test_kernel_rows_agree_with_torch_attention_within_a_bf16_step(heads: int, groups: int) -> None:
    # A short row, one at the end of its cache, a ring that wrapped, a long full-attention row.
    rows = _rows(heads, groups, 256, sizes=[40, 40, 64, 700], positions=[0, 39, 150, 600])
    out = _attend(rows)
    for r in range(4):
        want = _torch_attention(rows, r).float()
        got = out[r].float()
        # Both round the softmax weights and the output to bf16 from fp32 sums in their own
        # order: the same bits mostly, and otherwise a bf16 step of the row's largest value.
        assert (got - want).abs().max() <= 2**-7 * want.abs().max(), r
        assert (got == want).float().mean() > 0.7, r


def test_a_row_gets_the_same_bits_alone_as_in_any_batch_and_with_any_threads() -> None:
    rows = _rows(4, 1, 256, sizes=[64, 300, 64, 300, 64], positions=[5, 299, 64, 120, 200])
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


def test_the_new_key_and_value_land_in_their_slot_and_nothing_else_changes() -> None:
    rows = _rows(4, 2, 64, sizes=[16, 100], positions=[37, 3])
    k_caches = [c.clone() for c in rows["k_caches"]]
    v_caches = [c.clone() for c in rows["v_caches"]]
    assert native is not None
    v = rows["qkv"][:, 128:256]
    native.attend(rows["q"], rows["k"], v, k_caches, v_caches, rows["positions"], SCALE)
    for r, slot in enumerate([37 % 16, 3]):
        want_k, want_v = rows["k_caches"][r].clone(), rows["v_caches"][r].clone()
        want_k[:, slot] = rows["k"][r].view(2, 64)
        want_v[:, slot] = v[r].view(2, 64)
        assert torch.equal(k_caches[r], want_k) and torch.equal(v_caches[r], want_v)
