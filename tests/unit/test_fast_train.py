"""The hand-written training forward computes the transformers model's loss and LoRA gradients."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tunery.engine import fast_train
from tunery.engine.data import TokenizedExample, collate, pack, padded
from tunery.engine.fast_decode import PROJECTIONS, FastGemma3
from tunery.engine.fast_decode import pack as fast_decode_pack
from tunery.engine.fast_train import FastGemma3Train, lora_shapes
from tunery.engine.lora import lora_injected, lora_layers, save_peft_adapter, trainable_parameters
from tunery.engine.native import NativeKernels
from tunery.engine.specs import LoraSpec
from tunery.engine.train import label_loss


def _tiny_gemma(window: int, head_dim: int = 16) -> torch.nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=300,
        hidden_size=128,  # a multiple of the fused head's column tiles (128 with AVX-512)
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=512,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


def _examples(lengths: list[int]) -> list[TokenizedExample]:
    rng = random.Random(1)
    return [
        TokenizedExample(tuple(rng.randrange(1, 300) for _ in range(n)), prompt_len=max(1, n // 2))
        for n in lengths
    ]


def _loss_and_grads(
    fn: object, params: list[torch.nn.Parameter]
) -> tuple[float, list[torch.Tensor]]:
    loss = fn()  # type: ignore[operator]
    loss.backward()
    grads = [p.grad.detach().clone() for p in params]  # type: ignore[union-attr]
    for p in params:
        p.grad = None
    return float(loss.detach()), grads


@contextmanager
def _packed_forward(
    model: torch.nn.Module, spec: LoraSpec | None = None
) -> Iterator[tuple[FastGemma3Train, list[torch.nn.Parameter]]]:
    """LoRA layers of `spec` (rank 4 on the MLP by default) in `model`, each B given a value (it
    starts at 0), with the packed forward over them and their parameters."""
    with lora_injected(model, spec or LoraSpec(rank=4, alpha=8)) as layers:
        for layer in layers.values():
            torch.nn.init.normal_(layer.lora_B, std=0.05)
        yield FastGemma3Train(FastGemma3.of_model(model), layers), trainable_parameters(layers)


@pytest.mark.parametrize(
    ("lengths", "window"),
    [
        ([5, 9, 7], 64),  # short: one masked attention over the packed row
        ([40, 3, 25], 8),  # sliding window shorter than the examples
        ([150, 120, 30], 64),  # long: one attention per example, windowed on sliding layers
    ],
)
@pytest.mark.parametrize("targets", [LoraSpec().target_modules, PROJECTIONS])
@pytest.mark.parametrize("bf16_values", [False, True], ids=["fp32", "bf16-values"])
def test_matches_the_transformers_forward_in_fp32(
    lengths: list[int], window: int, targets: tuple[str, ...], bf16_values: bool
) -> None:
    """The default (MLP) targets, and all seven: groups of 1, 2 and 3 members. With fp32
    weights that are bf16 values (a bf16 checkpoint on a CPU without AVX512-BF16), the frozen
    matmuls forward and backward run on the native kernels' bf16 panels; with the kernels, the
    head's loss and gradient on their fused kernel, and no matmul copy of the head is built."""
    model = _tiny_gemma(window)
    if bf16_values:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16().float())
    examples = _examples(lengths)
    with lora_injected(model, LoraSpec(rank=4, alpha=8, target_modules=targets)) as layers:
        for layer in layers.values():
            torch.nn.init.normal_(layer.lora_B, std=0.05)  # B starts at 0: give it a value
        params = trainable_parameters(layers)
        reference = _loss_and_grads(
            lambda: label_loss(model, collate(examples, 0, torch.device("cpu"))), params
        )
        fast = FastGemma3Train(FastGemma3.of_model(model), layers)
        native = NativeKernels.load() is not None
        assert (fast.spec.layers[0].gu.narrow is not None) == (bf16_values and native)
        batch = pack(examples, torch.device("cpu"))
        got = _loss_and_grads(lambda: fast.loss(batch), params)
        # few label rows take the fused kernel, many the matmuls, built only then
        few_rows = batch.labels.shape[0] <= fast.head.FUSED_MAX_ROWS
        assert fast.head.has_matmul_copy == (not native or not few_rows)

    assert got[0] == pytest.approx(reference[0], rel=1e-5)
    for want, have in zip(reference[1], got[1], strict=True):
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-6)


_KERNELS = NativeKernels.load()


@pytest.mark.skipif(_KERNELS is None, reason="no native kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_fused_head_and_the_head_matmuls_agree(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """The head's fused kernel (one read of the weights, online softmax) and the two matmuls it
    replaces for few label rows give one loss and one gradient; many rows take the matmuls. A
    bf16 model's head takes the kernel for any rows where it runs on AMX tiles (its bf16
    logits, then, to the matmuls' bf16 rounding)."""
    if dtype == torch.bfloat16 and (_KERNELS is None or _KERNELS.head_loss_tile_rows == 0):
        pytest.skip("no AMX tiles: a bf16 head takes the matmuls")
    model = _tiny_gemma(64).to(dtype)
    few = _examples([9, 5, 7, 12])  # 17 label rows
    with _packed_forward(model) as (fast, params):
        batch = pack(few, torch.device("cpu"))
        assert batch.labels.shape[0] <= fast.head.FUSED_MAX_ROWS
        fused = _loss_and_grads(lambda: fast.loss(batch), params)
        assert not fast.head.has_matmul_copy
        with torch.no_grad():  # validation: the loss alone
            assert float(fast.loss(batch)) == fused[0]
        many = pack(_examples([150, 120, 30]), torch.device("cpu"))
        assert many.labels.shape[0] > fast.head.FUSED_MAX_ROWS
        fast.loss(many)
        # on tiles, in chunks of rows: the matmul copy is never built
        assert fast.head.has_matmul_copy == (dtype == torch.float32)
        assert fast.head.fuses_any_rows == (dtype == torch.bfloat16)
        if dtype == torch.bfloat16:  # each row's loss and gradient whatever the chunk
            whole = _loss_and_grads(lambda: fast.loss(many), params)
            monkeypatch.setattr(fast.head, "_chunk_rows", 16)
            chunked = _loss_and_grads(lambda: fast.loss(many), params)
            assert chunked[0] == pytest.approx(whole[0], rel=1e-6)
            for want, have in zip(whole[1], chunked[1], strict=True):
                torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-7)
        monkeypatch.setattr(fast.head, "_native", None)
        matmuls = _loss_and_grads(lambda: fast.loss(batch), params)
    if dtype == torch.float32:
        assert fused[0] == pytest.approx(matmuls[0], rel=1e-6)
        for want, have in zip(matmuls[1], fused[1], strict=True):
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-7)
        return
    assert fused[0] == pytest.approx(matmuls[0], rel=1e-3)
    for want, have in zip(matmuls[1], fused[1], strict=True):
        assert (have - want).abs().max() <= 3e-2 * want.abs().max()


@pytest.mark.skipif(NativeKernels.load() is None, reason="no native kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_and_torch_norms_give_one_loss_and_gradient(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """The norms (and the q/k heads' norm and rotation) on the native kernels and on torch's
    ops (a GPU's path) agree, forward and backward, in fp32 and in a bf16 model."""
    model = _tiny_gemma(64).to(dtype)
    batch = pack(_examples([9, 5, 7, 12]), torch.device("cpu"))
    with _packed_forward(model) as (fast, params):
        assert fast.spec.native is not None
        native = _loss_and_grads(lambda: fast.loss(batch), params)
        monkeypatch.setattr(fast.spec, "native", None)
        plain = _loss_and_grads(lambda: fast.loss(batch), params)
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    assert native[0] == pytest.approx(plain[0], rel=rel)
    for want, have in zip(plain[1], native[1], strict=True):
        scale = want.abs().max()
        assert (have - want).abs().max() <= rel * 4 * scale + 1e-7


@pytest.mark.parametrize("targets", [LoraSpec().target_modules, PROJECTIONS])
def test_lora_products_in_fp32_and_in_bf16_agree(
    monkeypatch: pytest.MonkeyPatch, targets: tuple[str, ...]
) -> None:
    """A bf16 model's small step takes its LoRA products in fp32 on the master weights, a large
    one in bf16: one loss and one gradient, to bf16's precision."""
    model = _tiny_gemma(64).to(torch.bfloat16)
    batch = pack(_examples([9, 5, 7, 12]), torch.device("cpu"))
    spec = LoraSpec(rank=4, alpha=8, target_modules=targets)
    with _packed_forward(model, spec) as (fast, params):
        assert batch.input_ids.shape[0] <= fast_train.LORA_FP32_MAX_ROWS
        fp32 = _loss_and_grads(lambda: fast.loss(batch), params)
        monkeypatch.setattr(fast_train, "LORA_FP32_MAX_ROWS", 0)
        bf16 = _loss_and_grads(lambda: fast.loss(batch), params)
    assert fp32[0] == pytest.approx(bf16[0], rel=2e-2)
    for want, have in zip(bf16[1], fp32[1], strict=True):
        assert have.dtype == torch.float32
        assert (have - want).abs().max() <= 8e-2 * want.abs().max() + 1e-7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_lora_products_agree_with_torchs(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """A small step's fp32 LoRA products by the native kernels (`lora_train.c`: rank 16, whole
    vectors) and by torch's ops: one loss and one gradient, to the activations' precision."""
    model = _tiny_gemma(64).to(dtype)
    batch = pack(_examples([9, 5, 7, 12]), torch.device("cpu"))
    spec = LoraSpec(rank=16, alpha=32, target_modules=PROJECTIONS)
    with _packed_forward(model, spec) as (fast, params):
        kernels = fast.spec.native
        if kernels is None:
            pytest.skip("no native kernels on this machine")
        calls = []
        forward = kernels.lora_train_forward
        monkeypatch.setattr(
            kernels, "lora_train_forward", lambda *a: calls.append(1) or forward(*a)
        )
        native = _loss_and_grads(lambda: fast.loss(batch), params)
        assert len(calls) == 4 * len(fast.groups)  # every group took the kernels
        monkeypatch.setattr(fast_train._Group, "_native", lambda *_: None)
        torchs = _loss_and_grads(lambda: fast.loss(batch), params)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert native[0] == pytest.approx(torchs[0], rel=tolerance)
    for want, have in zip(torchs[1], native[1], strict=True):
        assert have.dtype == torch.float32 and have.shape == want.shape
        assert (have - want).abs().max() <= 4 * tolerance * want.abs().max() + 1e-7


def test_dense_and_per_example_attention_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny_gemma(16)
    examples = _examples([30, 12, 21])
    with lora_injected(model, LoraSpec(rank=4, alpha=8)) as layers:
        fast = FastGemma3Train(FastGemma3.of_model(model), layers)
        batch = pack(examples, torch.device("cpu"))
        dense = float(fast.loss(batch))
        monkeypatch.setattr(fast_train, "DENSE_ATTENTION_MAX_TOKENS", 0)
        per_example = float(fast.loss(batch))
    assert per_example == pytest.approx(dense, rel=1e-5)


@pytest.mark.skipif(
    _KERNELS is None or not _KERNELS.attention_tiles, reason="no AMX tiles on this CPU"
)
@pytest.mark.parametrize("lengths", [[30, 12, 21], [150, 120, 30]], ids=["dense", "per-example"])
def test_tiles_attention_trains_as_the_torch_attention(
    monkeypatch: pytest.MonkeyPatch, lengths: list[int]
) -> None:
    """A bf16 step whose attention runs on AMX tiles (any tokens, each example's keys only)
    gives the loss and the LoRA gradients of the step that attends by `_attend` (one masked pass
    over a short row, or each example on its own), within bf16's rounding."""
    model = _tiny_gemma(16, head_dim=32).to(torch.bfloat16)
    examples = _examples(lengths)
    with _packed_forward(model) as (fast, params):
        kernels = fast.spec.native
        assert kernels is not None and kernels.attention_tiles
        batch = pack(examples, torch.device("cpu"))
        tiles = _loss_and_grads(lambda: fast.loss(batch), params)
        monkeypatch.setattr(kernels, "attention_tiles", False)
        torchs = _loss_and_grads(lambda: fast.loss(batch), params)
    assert tiles[0] == pytest.approx(torchs[0], rel=1e-2)
    for want, have in zip(torchs[1], tiles[1], strict=True):
        assert float((have - want).norm() / want.norm()) <= 3e-2


@pytest.mark.skipif(_KERNELS is None or not _KERNELS.tiles, reason="no AMX tiles on this CPU")
def test_frozen_matmuls_on_tiles_train_as_torchs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 step whose frozen projections run on `tiles_gemm` (forward, and backward on Wᵀ's
    copy) gives the loss and LoRA gradients of the step on torch's matmuls, within bf16's
    rounding."""
    model = _tiny_gemma(16, head_dim=32).to(torch.bfloat16)
    batch = pack(_examples([30, 12, 21]), torch.device("cpu"))
    spec = LoraSpec(rank=4, alpha=8, target_modules=PROJECTIONS)
    with _packed_forward(model, spec) as (fast, params):
        kernels = fast.spec.native
        assert kernels is not None
        calls: list[int] = []
        gemm = kernels.tiles_gemm
        monkeypatch.setattr(kernels, "tiles_gemm", lambda *a: calls.append(1) or gemm(*a))
        tiles = _loss_and_grads(lambda: fast.loss(batch), params)
        # each group's forward, each backward but the first layer's qkv (no input gradient)
        assert len(calls) == 2 * 4 * len(fast.groups) - 1
        monkeypatch.setattr(kernels, "tiles_gemm", lambda *_: None)
        torchs = _loss_and_grads(lambda: fast.loss(batch), params)
    assert tiles[0] == pytest.approx(torchs[0], rel=1e-2)
    for want, have in zip(torchs[1], tiles[1], strict=True):
        assert float((have - want).norm() / want.norm()) <= 3e-2


@pytest.mark.skipif(_KERNELS is None or not _KERNELS.tiles, reason="no AMX tiles on this CPU")
def test_lora_products_on_tiles_train_as_torchs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 step of many rows (its LoRA products in bf16) whose LoRA deltas join the frozen
    products' sums on AMX tiles (`tiles_gemm`'s second product) and whose LoRA weight gradients
    sum over the rows there (`lora_tn`) gives the loss and gradients of the step on torch's
    matmuls, within bf16's rounding; every rank-16 or -32 product takes the tiles."""
    model = _tiny_gemma(64, head_dim=32).to(torch.bfloat16)
    batch = pack(_examples([150, 120, 30]), torch.device("cpu"))  # past LORA_FP32_MAX_ROWS
    spec = LoraSpec(rank=16, alpha=32, target_modules=PROJECTIONS)
    with _packed_forward(model, spec) as (fast, params):
        kernels = fast.spec.native
        assert kernels is not None
        taken: list[int] = []
        tn, gemm = kernels.lora_tn, kernels.tiles_gemm
        monkeypatch.setattr(
            kernels, "lora_tn", lambda *a: (c := tn(*a)) is not None and taken.append(1) or c
        )
        fused: list[int] = []
        monkeypatch.setattr(
            kernels, "tiles_gemm", lambda *a: (len(a) > 2 and fused.append(1)) or gemm(*a)
        )
        tiles = _loss_and_grads(lambda: fast.loss(batch), params)
        # per layer: qkv's 3 Bs (its A's 48 ranks: not taken), o's A and B, gate/up's A and
        # 2 Bs, down's A and B
        assert len(taken) == 2 * (3 + 2 + 3 + 2)
        # the deltas in the frozen products' sums: each group's forward, each backward but the
        # first layer's qkv (no input gradient)
        assert len(fused) == 2 * 4 * len(fast.groups) - 1
        monkeypatch.setattr(kernels, "lora_tn", lambda *_: None)
        monkeypatch.setattr(kernels, "tiles_gemm", lambda *_: None)
        torchs = _loss_and_grads(lambda: fast.loss(batch), params)
    assert tiles[0] == pytest.approx(torchs[0], rel=1e-2)
    for want, have in zip(torchs[1], tiles[1], strict=True):
        assert float((have - want).norm() / want.norm()) <= 3e-2


def test_padded_adds_one_label_less_example_up_to_the_multiple() -> None:
    batch = pack(_examples([5, 9, 7]), torch.device("cpu"))  # 21 tokens
    assert padded(batch, 7, 0) is batch  # already a multiple
    more = padded(batch, 16, 0)
    assert more.input_ids.shape[0] == 32
    assert more.input_ids[21:].tolist() == [0] * 11
    assert more.positions[21:].tolist() == list(range(11))
    assert set(more.segments[21:].tolist()) == {int(batch.segments.max()) + 1}
    assert more.bounds == (*batch.bounds, (21, 32))
    assert torch.equal(more.label_positions, batch.label_positions)
    assert torch.equal(more.labels, batch.labels)


@pytest.mark.parametrize("lengths", [[5, 9, 7], [150, 120, 30]], ids=["dense", "per-example"])
def test_filler_rows_change_neither_the_loss_nor_the_gradients(
    monkeypatch: pytest.MonkeyPatch, lengths: list[int]
) -> None:
    """A step padded with filler rows (`_row_multiple`: so oneDNN meets few row counts) has the
    loss and LoRA gradients of the same step unpadded: the filler attends to itself alone and
    predicts nothing."""
    model = _tiny_gemma(64)
    examples = _examples(lengths)
    with _packed_forward(model) as (fast, params):
        batch = pack(examples, torch.device("cpu"))
        monkeypatch.setattr(fast_train, "_row_multiple", lambda tokens: 1)
        plain = _loss_and_grads(lambda: fast.loss(batch), params)
        monkeypatch.setattr(fast_train, "_row_multiple", lambda tokens: 64)
        filled = _loss_and_grads(lambda: fast.loss(batch), params)
    assert filled[0] == pytest.approx(plain[0], rel=1e-6)
    for want, have in zip(plain[1], filled[1], strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("rows", "width", "out"), [(704, 2048, 640), (768, 1536, 640)])
def test_row_blocks_give_the_products_of_one_call(rows: int, width: int, out: int) -> None:
    """A narrow product of many bf16 rows goes by row blocks (`_row_block`, for oneDNN's
    speed); each row's outputs are those of one call over all the rows, to bf16's rounding."""
    weight = torch.randn(out, width).bfloat16()
    packed = fast_decode_pack(weight)
    if packed is None:
        pytest.skip("oneDNN does not pre-pack bf16 weights on this CPU")
    x = torch.randn(rows, width).bfloat16()
    assert fast_train._row_block(x, out) > 0
    blocked = fast_train._packed_linear(x, packed, out)
    want = x.float() @ weight.float().t()
    assert blocked.shape == (rows, out) and blocked.dtype == torch.bfloat16
    assert float((blocked.float() - want).norm() / want.norm()) <= 2**-8
    assert fast_train._row_block(x[:320], out) == 0  # few rows: one call


def test_partial_groups_are_refused_up_front() -> None:
    assert FastGemma3Train.targets_fit(["q_proj", "k_proj", "v_proj", "o_proj"])
    assert not FastGemma3Train.targets_fit(["q_proj", "v_proj"])
    assert not FastGemma3Train.targets_fit(["lm_head"])
    assert not FastGemma3Train.targets_fit([])


@pytest.mark.parametrize("targets", [LoraSpec().target_modules, PROJECTIONS])
def test_lora_layers_without_a_model_are_the_injected_ones_and_save_for_peft(
    targets: tuple[str, ...], tmp_path: Path
) -> None:
    """The layers the packed forward trains, made from the projections' shapes alone (no
    transformers model), come in the model's module order with the same initial weights for the
    same seed (so a run, a resumed checkpoint and its optimizer state match either way); their
    adapter, written without PEFT, loads in PEFT with the same weights and scaling."""
    from peft import PeftModel

    model = _tiny_gemma(64)
    spec = LoraSpec(rank=4, alpha=8, target_modules=targets)
    torch.manual_seed(5)
    with lora_injected(model, spec) as injected:
        want = {
            path: (layer.lora_A.detach().clone(), layer.lora_B) for path, layer in injected.items()
        }
    torch.manual_seed(5)
    layers = lora_layers(lora_shapes(FastGemma3.of_model(model)), spec, torch.device("cpu"))
    assert list(layers) == list(want)
    for path, layer in layers.items():
        assert torch.equal(layer.lora_A, want[path][0]) and not layer.lora_B.any()
        assert layer.lora_A.device.type == "cpu" and layer.base.weight.device.type == "meta"
        torch.nn.init.normal_(layer.lora_B)

    # they train on the packed forward; the model's own weights, not frozen here, get nothing
    assert all(p.requires_grad for p in model.parameters())
    fast = FastGemma3Train(FastGemma3.of_model(model), layers)
    fast.loss(pack(_examples([9, 5, 7]), torch.device("cpu"))).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None and p.grad.any() for p in trainable_parameters(layers))

    save_peft_adapter(layers, spec, "tiny-gemma", tmp_path / "adapter")
    tuned = PeftModel.from_pretrained(model, tmp_path / "adapter")
    modules = dict(tuned.base_model.model.named_modules())
    for path, layer in layers.items():
        module = modules[path]
        assert torch.equal(module.lora_A["default"].weight, layer.lora_A)
        assert torch.equal(module.lora_B["default"].weight, layer.lora_B)
        assert module.scaling["default"] == spec.alpha / spec.rank
