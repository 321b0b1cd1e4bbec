"""A GGUF's block-quantized projections as codes and scales (`gguf_blocks`): each format the
embedded Q4_K_M file holds unpacks to gguf-py's own dequantized values, and to the model's bf16
weights bit for bit, which the decode kernels then read (`qtiles.c`)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from tunery.engine import kernel_cache
from tunery.engine.base_models import DEFAULT_BASE_MODEL, BaseModelRegistry, LoadedBase
from tunery.engine.fast_decode import FastGemma3
from tunery.engine.gguf_blocks import Blocks, GgufBlocks, matching, stacked
from tunery.engine.gguf_metadata import read_tensor_infos
from tunery.engine.kernel_cache import KernelCache
from tunery.engine.native import NativeKernels, PackedBlocks, PackedLinear


@pytest.fixture(scope="module")
def base(models_dir: Path) -> LoadedBase:
    return BaseModelRegistry(models_dir).load(DEFAULT_BASE_MODEL)


def _fresh(base: LoadedBase) -> dict[str, torch.Tensor]:
    """The weights with a new embedding tensor: to the in-memory packs (kept by it), another
    process's."""
    weights = dict(base.weights)
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"].clone()
    return weights


def _raw(path: Path, name: str) -> tuple[np.ndarray, GGMLQuantizationType, tuple[int, int]]:
    info = read_tensor_infos(path)[name]
    kind = GGMLQuantizationType(info.ggml_type)
    n_in, out = info.dims
    size, nbytes = {"Q8_0": (32, 34), "Q5_0": (32, 22), "Q4_K": (256, 144), "Q6_K": (256, 210)}[
        kind.name
    ]
    raw = np.fromfile(path, np.uint8, count=out * n_in // size * nbytes, offset=info.offset)
    return raw.reshape(out, -1), kind, (out, n_in)


def test_each_format_unpacks_to_gguf_pys_values(base: LoadedBase) -> None:
    """Q5_0, Q8_0, Q4_K and Q6_K projections: codes times scales less offsets are the values
    gguf-py's dequantization gives (the one transformers loads the file with), exactly."""
    path = base.gguf()
    assert path is not None
    blocks = GgufBlocks(base.gguf)
    seen = set()
    for layer, proj, name in [
        (0, "q_proj", "attn_q"), (0, "v_proj", "attn_v"), (1, "v_proj", "attn_v"),
        (0, "o_proj", "attn_output"), (0, "down_proj", "ffn_down"),
        (1, "down_proj", "ffn_down"),
    ]:  # fmt: skip
        raw, kind, shape = _raw(path, f"blk.{layer}.{name}.weight")
        group = "mlp" if proj.endswith("down_proj") else "self_attn"
        got = blocks.of(f"model.layers.{layer}.{group}.{proj}.weight")
        assert got is not None and tuple(got.codes.shape) == shape
        want = torch.from_numpy(dequantize(raw, kind).reshape(shape))
        assert torch.equal(got.dequantized(), want), kind.name
        seen.add(kind.name)
    assert seen == {"Q5_0", "Q8_0", "Q4_K", "Q6_K"}
    embed = blocks.of("model.embed_tokens.weight")  # the vocab head (tied): Q8_0
    assert embed is not None and embed.matches(base.weights["model.embed_tokens.weight"])
    assert blocks.of("model.norm.weight") is None  # neither a projection nor the head
    assert GgufBlocks(lambda: None).of("model.layers.0.self_attn.q_proj.weight") is None


def test_a_truncated_or_foreign_gguf_gives_no_blocks(base: LoadedBase, tmp_path: Path) -> None:
    """A GGUF cut short (its header whole, its tensors not) or not a GGUF at all: no blocks,
    and no error, so the forward keeps its bf16 tiles."""
    path = base.gguf()
    assert path is not None
    cut = tmp_path / "cut.gguf"
    with open(path, "rb") as f:
        cut.write_bytes(f.read(8 * 2**20))  # the header and the first tensors
    name = "model.layers.17.mlp.down_proj.weight"  # near the file's end
    assert GgufBlocks(lambda: cut).of(name) is None
    other = tmp_path / "other.gguf"
    other.write_bytes(b"not a gguf file")
    assert GgufBlocks(lambda: other).of(name) is None


def test_every_projection_is_its_blocks_and_decodes_with_the_same_bits(base: LoadedBase) -> None:
    """Every fused projection of the embedded model is exactly its GGUF blocks (stacked across
    formats), so the fast forward reads the blocks on AMX tiles; a step gives the same hidden
    states, bit for bit, as the forward on the bf16 tiles, and a weight changed by one value
    is refused."""
    kernels = NativeKernels.load()
    if kernels is None or not kernels.tiles or not kernels.steps:
        pytest.skip("no AMX tiles or whole-step kernel on this CPU")
    of = GgufBlocks(base.gguf).of
    fused = [f"model.layers.2.self_attn.{p}_proj.weight" for p in "qkv"]
    weights = [base.weights[n] for n in fused]
    assert matching(of, fused, weights) is not None
    changed = weights[1].clone()
    changed[3, 5] = -changed[3, 5] if changed[3, 5] != 0 else 1.0
    assert matching(of, fused, [weights[0], changed, weights[2]]) is None
    quantized = FastGemma3(base.config, base.weights, blocks=of)
    plain = FastGemma3(base.config, base.weights, native=True)
    for fast, kind in ((quantized, PackedBlocks), (plain, PackedLinear)):
        packs = [p.tiled for layer in fast.layers for p in layer.projections]
        assert {type(p[1]) for p in packs if p is not None} == {kind}
    assert isinstance(quantized.head_blocks, PackedBlocks) and plain.head_blocks is None
    prompt = [2, 818, 5279, 529, 9405, 563, 236743]
    outs = []
    for fast in (quantized, plain):
        cache = fast.new_cache(len(prompt) + 4)
        hidden = [fast.prefill(prompt, cache, None)]
        for token in (1000, 2000, 3000):
            hidden.append(fast.step(torch.tensor([token]), cache, None))
        outs.append(torch.cat(hidden))
    assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))
    for k in (1, 64):  # a sampler's top-k from the head's blocks: the bf16 head's
        got, want = quantized.top_logits(outs[0], k), plain.top_logits(outs[0], k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_blocks_of_several_formats_stack_into_the_finest() -> None:
    """A fused projection of parts in different formats: per-32 scales repeat into per-16 ones
    and missing offsets are zeros; the values stay the same."""
    g = torch.Generator().manual_seed(3)
    a = Blocks(
        torch.randint(-16, 16, (16, 64), generator=g, dtype=torch.int8),
        torch.rand(16, 2, generator=g), None, 32,
    )  # fmt: skip
    b = Blocks(
        torch.randint(-32, 32, (32, 64), generator=g, dtype=torch.int8),
        torch.rand(32, 4, generator=g), None, 16,
    )  # fmt: skip
    c = Blocks(
        torch.randint(0, 16, (16, 64), generator=g, dtype=torch.int8),
        torch.rand(16, 2, generator=g), torch.rand(16, 2, generator=g), 32,
    )  # fmt: skip
    both = stacked([a, b, c])
    assert both.block == 16 and both.offset is not None
    want = torch.cat([a.dequantized(), b.dequantized(), c.dequantized()])
    assert torch.equal(both.dequantized(), want)


def test_a_later_process_reads_the_blocks_packs_instead_of_the_gguf(
    base: LoadedBase, tmp_path: Path
) -> None:
    """The blocks' packs go into the kernel cache with the rest; a later process (here: a new
    embedding tensor, which the in-memory caches do not know) reads them there without
    unpacking the GGUF again, and decodes the same bits."""
    kernels = NativeKernels.load()
    if kernels is None or not kernels.tiles:
        pytest.skip("no AMX tiles on this CPU")
    cache = KernelCache(tmp_path / "packs", "stamp")
    first = FastGemma3(base.config, _fresh(base), cache=cache, blocks=GgufBlocks(base.gguf).of)
    deadline = time.monotonic() + 60
    while not cache.file(kernels).exists():  # written in the background
        assert time.monotonic() < deadline, "the packs were not saved"
        time.sleep(0.05)
    saved = kernel_cache.read(cache, kernels, None)
    assert saved is not None
    assert len(saved.blocks) == 4 * base.config.num_hidden_layers + 1  # and the head
    assert all(isinstance(p, PackedBlocks) for p in saved.blocks.values())

    def unpacked(name: str) -> None:
        raise AssertionError(f"{name} was unpacked again")

    later = FastGemma3(base.config, _fresh(base), cache=cache, blocks=unpacked)
    prompt = [2, 818, 5279, 529, 9405]
    hidden = []
    for fast in (first, later):
        kv = fast.new_cache(len(prompt) + 1)
        fast.prefill(prompt, kv, None)
        hidden.append(fast.step(torch.tensor([1000]), kv, None))
    assert torch.equal(hidden[0].view(torch.int16), hidden[1].view(torch.int16))
