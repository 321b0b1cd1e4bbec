"""The fast forward's packed weights on disk: written once, read back by a later process (here:
fresh tensors, which the in-memory caches do not know) with the same decode bits; a torn file is
packed again and rewritten."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.unit.test_generate import _load
from tunery.engine import kernel_cache
from tunery.engine.fast_decode import FastGemma3, model_tensors
from tunery.engine.kernel_cache import KernelCache
from tunery.engine.native import NativeKernels

KERNELS = NativeKernels.load()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="no C compiler on this machine")


@pytest.fixture(scope="module")
def model(tiny_model_path: Path) -> tuple[Any, dict[str, torch.Tensor], list[int]]:
    base = _load(tiny_model_path)
    # fp32 weights that are bf16 values (a CPU without AVX512-BF16): the panels' case
    tensors = {name: t.detach().float() for name, t in model_tensors(base.model).items()}
    ids = base.tokenizer("The capital of France is")["input_ids"]
    return base.model.config, tensors, ids


def _fresh(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights in new tensors: to the in-memory caches, another process's."""
    return {name: t.clone() for name, t in tensors.items()}


def _saved(cache: KernelCache, head: torch.Tensor) -> kernel_cache.Packs:
    assert KERNELS is not None
    deadline = time.monotonic() + 60
    while not cache.file(KERNELS).exists():  # written in the background, renamed into place
        assert time.monotonic() < deadline, "the packs were not saved"
        time.sleep(0.05)
    packs = kernel_cache.read(cache, KERNELS, head)
    assert packs is not None
    return packs


def _decode(fast: FastGemma3, ids: list[int]) -> tuple[torch.Tensor, list[int]]:
    with torch.inference_mode():
        cache = fast.new_cache(len(ids) + 3)
        hidden = fast.prefill(ids, cache, None)
        picks = []
        for _ in range(3):
            picks += fast.best_tokens(hidden)
            hidden = fast.step(torch.tensor(picks[-1:]), cache, None)
    return hidden, picks


def test_a_later_process_reads_the_saved_packs_and_decodes_the_same_bits(
    model: tuple[Any, dict[str, torch.Tensor], list[int]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config, tensors, ids = model
    cache = KernelCache(tmp_path / "packs", "stamp")
    first = FastGemma3(config, _fresh(tensors), cache=cache)
    if first.packed_head is None:
        pytest.skip("no head kernel (AVX2 or AVX512-VNNI) on this CPU")
    saved = _saved(cache, first.head_weight)
    assert saved.head is not None and "head" not in saved.linears  # the head's panels: rebuilt
    assert {"0.qkv", "0.o", "0.gu", "0.down", "1.down"} <= saved.linears.keys()

    narrowed: list[tuple[int, ...]] = []
    narrow = NativeKernels.narrow_linear

    def counted(self: NativeKernels, weight: torch.Tensor) -> Any:
        narrowed.append(tuple(weight.shape))
        return narrow(self, weight)

    def no_pack(self: NativeKernels, weight: torch.Tensor) -> Any:
        raise AssertionError("the head was packed again")

    monkeypatch.setattr(NativeKernels, "narrow_linear", counted)
    monkeypatch.setattr(NativeKernels, "pack_head", no_pack)
    later_tensors = _fresh(tensors)
    later = FastGemma3(config, later_tensors, cache=cache)
    head = tensors["model.embed_tokens.weight"]
    assert narrowed == [tuple(head.shape)]  # only the head's own panels were packed

    def no_read(*args: object) -> None:
        raise AssertionError("the file was read again")

    # a process's next forward of the same weights (a worker's next job) finds them in memory
    monkeypatch.setattr(kernel_cache, "read", no_read)
    FastGemma3(config, later_tensors, cache=cache)
    FastGemma3(config, later_tensors, head_scan=False, cache=cache)
    hidden, picks = _decode(later, ids)
    want_hidden, want_picks = _decode(first, ids)
    assert torch.equal(hidden, want_hidden) and picks == want_picks


def test_a_torn_file_is_packed_again_and_rewritten_whole(
    model: tuple[Any, dict[str, torch.Tensor], list[int]], tmp_path: Path
) -> None:
    assert KERNELS is not None
    config, tensors, ids = model
    cache = KernelCache(tmp_path / "packs", "stamp")
    built = FastGemma3(config, _fresh(tensors))  # no cache: the reference
    if built.packed_head is None:
        pytest.skip("no head kernel (AVX2 or AVX512-VNNI) on this CPU")
    cache.directory.mkdir(parents=True)
    cache.file(KERNELS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    stale = cache.directory / "packs-stamp-another-build.safetensors"
    stale.write_bytes(b"x")
    assert kernel_cache.read(cache, KERNELS, None) is None

    fast = FastGemma3(config, _fresh(tensors), cache=cache)
    assert _decode(fast, ids)[1] == _decode(built, ids)[1]
    deadline = time.monotonic() + 60
    while kernel_cache.read(cache, KERNELS, None) is None:
        assert time.monotonic() < deadline, "the file was not rewritten"
        time.sleep(0.05)
    while stale.exists():  # another build's packs are removed once these are in place
        assert time.monotonic() < deadline, "the other build's file was left"
        time.sleep(0.05)
