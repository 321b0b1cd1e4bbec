"""The fast decode forward on a tiny random Gemma 3 (sliding window 64): the same tokens as the
transformers forward, past the window, with an adapter, in batches; int8 stays close."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.greedy_ties import assert_greedy_up_to_ties, fast_tokens
from tests.unit.test_generate import _greedy, _load
from tunery.engine.base_models import LoadedBase
from tunery.engine.fast_decode import FastGemma3
from tunery.engine.generate import Backend, Generator
from tunery.engine.native import NativeKernels
from tunery.engine.specs import GenerationParams

LONG = " ".join(f"word{i}" for i in range(60))  # > 64 tokens: the windowed prompt mask


@pytest.fixture
def adapter_dir(tiny_model_path: Path, tmp_path: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"])
    config.init_lora_weights = False
    get_peft_model(_load(tiny_model_path).model, config).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _texts(
    gen: Generator, prompt: str, params: GenerationParams, adapter: Path | None
) -> list[str]:
    return [c.text for c in gen.generate(prompt, params, adapter).candidates]


@pytest.mark.parametrize("prompt", ["The capital of France is", LONG])
def test_fast_with_torch_attention_matches_reference_past_the_window(
    tiny_model_path: Path, adapter_dir: Path, prompt: str
) -> None:
    """With torch's attention (the reference's kernel) the fast forward gets the same bits."""
    ref = Generator(_load(tiny_model_path), backend=Backend.REFERENCE)
    fast = Generator(_load(tiny_model_path), backend=Backend.FAST, native_kernels=False)
    greedy = GenerationParams(max_output_tokens=100)  # decodes past the 64-token window
    sampled = GenerationParams(max_output_tokens=20, candidate_count=3, temperature=1.0, seed=3)
    for adapter in (None, adapter_dir, None):
        for params in (greedy, sampled):
            assert _texts(fast, prompt, params, adapter) == _texts(ref, prompt, params, adapter)


@pytest.mark.skipif(NativeKernels.load() is None, reason="no C compiler on this machine")
@pytest.mark.parametrize("prompt", ["The capital of France is", LONG])
def test_fast_with_native_attention_picks_the_reference_tokens_up_to_ties(
    tiny_model_path: Path, adapter_dir: Path, prompt: str
) -> None:
    """The C attention kernel rounds in its own order: every greedy token, past the window and
    with an adapter, is the reference forward's best or ties with it (`greedy_ties`)."""
    from peft import PeftModel

    fast = Generator(_load(tiny_model_path), backend=Backend.FAST)
    assert fast._fast_model() is not None and fast._fast_model().native is not None
    greedy = GenerationParams(max_output_tokens=100)  # decodes past the 64-token window
    plain = _load(tiny_model_path).model
    tuned = PeftModel.from_pretrained(_load(tiny_model_path).model, adapter_dir)
    for adapter, model in ((None, plain), (adapter_dir, tuned)):
        ids, tokens = fast_tokens(fast, prompt, greedy, adapter)
        assert len(tokens) == 100
        assert_greedy_up_to_ties(model, ids, tokens)


def test_int8_hidden_states_stay_close(tiny_model_path: Path) -> None:
    base: LoadedBase = _load(tiny_model_path)
    ids = base.tokenizer("The capital of France is")["input_ids"]
    with torch.inference_mode():
        bf16, int8 = (
            FastGemma3.of_model(base.model, "bf16"),
            FastGemma3.of_model(base.model, "int8"),
        )
        caches = bf16.new_cache(len(ids) + 1), int8.new_cache(len(ids) + 1)
        bf16.prefill(ids, caches[0], None)
        int8.prefill(ids, caches[1], None)
        token = torch.tensor([5])
        a, b = bf16.step(token, caches[0], None), int8.step(token, caches[1], None)
        assert torch.nn.functional.cosine_similarity(a.float(), b.float()).item() > 0.99
        assert bf16.logits(a).argmax() == int8.logits(a).argmax()


def test_int8_steps_take_the_native_kernel_and_greedy_scans_the_exact_head(
    tiny_model_path: Path,
) -> None:
    """The native int8 kernel computes what torch's does on the same int8 weights (fp32 sums in
    another order); a greedy pick scans the head (it keeps no int8 copy) and is the argmax of
    its exact logits, and the unbatched decode loop picks with it. Without the scan, the int8
    head's best logits are recomputed exactly, on either int8 kernel."""
    from tunery.engine.fast_decode import model_tensors

    if NativeKernels.load() is None:
        pytest.skip("no C compiler on this machine")
    base: LoadedBase = _load(tiny_model_path)
    ids = base.tokenizer("The capital of France is")["input_ids"]
    # fp32 weights (as a CPU without AVX512-BF16 runs the model): the native kernel's case
    tensors = {name: t.detach().float() for name, t in model_tensors(base.model).items()}
    with torch.inference_mode():
        ours = FastGemma3(base.model.config, tensors, "int8")
        if ours.packed_head is None:
            pytest.skip("no head kernel (AVX2 or AVX512-VNNI) on this CPU")
        torchs = FastGemma3(base.model.config, tensors, "int8", native=False)
        layer = ours.layers[0]
        assert all(g.q_native is not None and g.q is None for g in (layer.qkv, layer.gu))
        assert torchs.layers[0].qkv.q is not None and torchs.layers[0].qkv.q_native is None
        assert ours.packed_head is not None and not ours.head.int8
        assert ours.batchable and not torchs.batchable  # torch's: 8 rows int8, more bf16
        caches = ours.new_cache(len(ids) + 4), torchs.new_cache(len(ids) + 4)
        prompt = ours.prefill(ids, caches[0], None)
        torchs.prefill(ids, caches[1], None)
        # a prompt runs on the bf16 weights (short ones too): the bits of the bf16 forward
        bf16 = FastGemma3(base.model.config, tensors, "bf16")
        for n in (1, 5, len(ids)):
            want = bf16.prefill(ids[:n], bf16.new_cache(n), None)
            assert torch.equal(ours.prefill(ids[:n], ours.new_cache(n), None), want), n
        assert torch.equal(prompt, want)
        for token in (5, 17, 300):
            a = ours.step(torch.tensor([token]), caches[0], None)
            b = torchs.step(torch.tensor([token]), caches[1], None)
            assert (a - b).abs().max() <= 1e-4 * b.abs().max()
            assert ours.best_tokens(a) == [int(ours.logits(a).argmax())]
        # without the scan the head is int8 too, and its best logits are recomputed exactly
        unscanned = FastGemma3(base.model.config, tensors, "int8", head_scan=False)
        assert unscanned.packed_head is None and unscanned.head.int8
        assert not unscanned.batchable  # the rescoring's matmul spans the batch's rows
        cache = unscanned.new_cache(len(ids) + 1)
        unscanned.prefill(ids, cache, None)
        hidden = unscanned.step(torch.tensor([5]), cache, None)
        logits = unscanned.logits(hidden)[0]
        best = int(logits.argmax())
        exact = float(hidden[0].double() @ tensors["model.embed_tokens.weight"][best].double())
        assert abs(float(logits[best]) - exact) <= 1e-5 * abs(exact)
    generator = Generator(base, backend=Backend.FAST_INT8)
    scanned: list[int] = []
    fast = generator._fast_model()
    assert fast is not None
    best = fast.best_tokens
    fast.best_tokens = lambda hidden: scanned.append(1) or best(hidden)  # type: ignore[method-assign]
    result = generator.generate("The capital of France is", _greedy(6)).candidates[0]
    assert result.token_count > 0 and len(scanned) == result.token_count


def test_fp32_weights_narrow_to_bf16_only_when_no_value_rounds() -> None:
    import torch

    from tunery.engine.fast_decode import narrow_weight

    kernels = NativeKernels.load()
    if kernels is None:
        pytest.skip("no C compiler on this machine")
    owner = torch.zeros(1)
    values = torch.randn(8, 16).bfloat16().float()
    narrowed = narrow_weight(owner, "bf16 values", lambda: [values[:3], values[3:]], kernels)
    assert narrowed is not None and (narrowed.n_out, narrowed.n_in) == (8, 16)
    x = torch.randn(2, 16)
    assert torch.allclose(kernels.linear_bf16w(x, narrowed), x @ values.t(), atol=1e-5)
    assert narrow_weight(owner, "fp32 values", lambda: [values + 1e-3], kernels) is None


def test_a_cache_repeated_then_narrowed_steps_as_a_lone_one(tiny_model_path: Path) -> None:
    """The native attention's per-layer cache tables are made once per cache: `repeat` and
    `select` (candidates sharing a prompt, then some finishing) must remake them."""
    from tunery.engine.fast_decode import model_tensors

    if NativeKernels.load() is None:
        pytest.skip("no C compiler on this machine")
    base: LoadedBase = _load(tiny_model_path)
    tensors = {name: t.detach().float() for name, t in model_tensors(base.model).items()}
    fast = FastGemma3(base.model.config, tensors)
    ids = base.tokenizer("The capital of France is")["input_ids"]
    with torch.inference_mode():
        lone, shared = fast.new_cache(len(ids) + 3), fast.new_cache(len(ids) + 3)
        fast.prefill(ids, lone, None)
        want = fast.step(torch.tensor([7]), lone, None)
        fast.prefill(ids, shared, None)
        fast.step(torch.tensor([3]), shared, None)  # tables made for one row
        shared.length -= 1  # step again at the same position, now as three rows
        shared.repeat(3)
        three = fast.step(torch.tensor([5, 7, 9]), shared, None)
        shared.select(torch.tensor([1]))
        shared.length -= 1
        again = fast.step(torch.tensor([7]), shared, None)
    assert torch.equal(three[1], want[0]) and torch.equal(again, want)


@pytest.mark.parametrize(
    ("dtype", "tiled"), [(torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True)]
)
def test_a_prompts_projected_rows_do_not_depend_on_the_prompts_beside_it(
    dtype: torch.dtype, tiled: bool
) -> None:
    """The model's shapes (640 → 1536), short and long prompts: each prompt's rows projected
    among others get the bits they get alone. (One 72-row oneDNN bf16 call rounded some rows
    unlike an 8-row one on a CPU with AMX.) With AMX tiles the prompts are cut into calls of
    `Linear.TILED_MAX_ROWS` rows wherever a cut falls, and still do."""
    from tunery.engine.fast_decode import Linear, _project_prompts, pack
    from tunery.engine.native import NativeKernels

    torch.manual_seed(0)
    weight = (torch.randn(1536, 640) * 0.05).to(dtype)
    tiles = None
    if tiled:
        native = NativeKernels.load()
        packed = None if native is None or not native.tiles else native.tiles_pack(weight)
        if native is None or packed is None:
            pytest.skip("no AMX tiles on this CPU")
        tiles = (native, packed)
    linear = Linear([weight], "bf16", pack(weight), tiled=tiles)
    assert linear.free_rows(dtype) == (Linear.TILED_MAX_ROWS if tiled else 0)
    lengths = [6, 7, 1, 8, 2, 40, 5, 33, 3, 9, 8, 1, 70, 64, 12]
    x = torch.randn(1, sum(lengths), 640).to(dtype)
    together = _project_prompts(linear, x, lengths)
    start = 0
    for t in lengths:
        alone = _project_prompts(linear, x[:, start : start + t], [t])
        assert torch.equal(together[:, start : start + t], alone), (start, t)
        start += t
