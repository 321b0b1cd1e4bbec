"""Generator on a tiny random Gemma 3: HF greedy parity, stops, sampling, streaming, adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.greedy_ties import assert_greedy_up_to_ties, fast_tokens
from tunery.engine.base_models import BaseModelInfo, LoadedBase
from tunery.engine.data import format_prompt
from tunery.engine.generate import Backend, Generator
from tunery.engine.specs import FinishReason, GenerationParams
from tunery.errors import FailedPrecondition, InvalidArgument

PROMPT = "The capital of France is"


def _load(path: Path) -> LoadedBase:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    info = BaseModelInfo(name="tiny", source=str(path), display_name="tiny", description="")
    return LoadedBase(
        info, model, AutoTokenizer.from_pretrained(path), path, torch.device("cpu"), torch.bfloat16
    )


@pytest.fixture(scope="module")
def base(tiny_model_path: Path) -> LoadedBase:
    return _load(tiny_model_path)


@pytest.fixture(scope="module")
def gen(base: LoadedBase) -> Generator:
    return Generator(base)


@pytest.fixture
def adapter_dir(tiny_model_path: Path, tmp_path: Path) -> Path:
    """A LoRA adapter with random (non-zero) weights, saved in PEFT's format."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = _load(tiny_model_path).model
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"])
    config.init_lora_weights = False  # random B too, so the adapter changes the output
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _greedy(n: int, **kw: Any) -> GenerationParams:
    return GenerationParams(max_output_tokens=n, **kw)


def test_greedy_matches_hf_generate_token_for_token(base: LoadedBase) -> None:
    """With torch's kernels (the reference's ops), HF's tokens exactly; with the C kernels,
    which round in their own order, HF's tokens up to near ties (`greedy_ties`)."""
    ids = base.tokenizer(PROMPT, return_tensors="pt").input_ids
    hf = base.model.generate(ids, do_sample=False, max_new_tokens=24)[0, ids.shape[1] :]

    result = Generator(base, native_kernels=False).generate(PROMPT, _greedy(24))

    (cand,) = result.candidates
    assert cand.text == base.tokenizer.decode(hf, skip_special_tokens=True)
    assert cand.token_count == len(hf) == 24
    assert cand.finish_reason is FinishReason.MAX_TOKENS
    assert result.prompt_token_count == ids.shape[1]
    native = Generator(base)
    prompt_ids, tokens = fast_tokens(native, PROMPT, _greedy(24), None)
    assert len(tokens) == 24
    assert_greedy_up_to_ties(base.model, prompt_ids, tokens)


def test_stop_sequence_cuts_text_before_it_and_reports_stop(gen: Generator) -> None:
    full = gen.generate(PROMPT, _greedy(24)).candidates[0].text
    start = len(full) // 2
    stop = full[start : start + 3]
    expected = full[: full.index(stop)]

    cand = gen.generate(PROMPT, _greedy(24, stop_sequences=("never there", stop))).candidates[0]

    assert cand.text == expected
    assert cand.finish_reason is FinishReason.STOP
    assert cand.token_count < 24


def test_eos_from_generation_config_stops_without_text(tiny_model_path: Path) -> None:
    base = _load(tiny_model_path)
    ids = base.tokenizer(PROMPT, return_tensors="pt").input_ids
    hf = base.model.generate(ids, do_sample=False, max_new_tokens=6)[0, ids.shape[1] :]
    base.model.generation_config.eos_token_id = [base.tokenizer.eos_token_id, int(hf[3])]

    cand = Generator(base).generate(PROMPT, _greedy(24)).candidates[0]

    assert cand.finish_reason is FinishReason.STOP
    assert cand.text == base.tokenizer.decode(hf[:3], skip_special_tokens=True)
    assert cand.token_count == 4  # the EOS token was generated, so it counts


def test_max_output_tokens_reports_max_tokens(gen: Generator) -> None:
    cand = gen.generate(PROMPT, _greedy(5)).candidates[0]
    assert (cand.finish_reason, cand.token_count) == (FinishReason.MAX_TOKENS, 5)


def test_seeded_sampling_is_deterministic_and_seed_dependent(gen: Generator) -> None:
    def sample(seed: int) -> tuple[str, ...]:
        params = GenerationParams(
            temperature=1.0, top_k=40, top_p=0.9, seed=seed, max_output_tokens=16, candidate_count=3
        )
        return tuple(c.text for c in gen.generate(PROMPT, params).candidates)

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert len(set(first)) > 1  # candidates are independent samples


def test_greedy_candidates_are_batched_and_identical(gen: Generator) -> None:
    texts = {c.text for c in gen.generate(PROMPT, _greedy(8, candidate_count=3)).candidates}
    assert len(texts) == 1


@pytest.mark.parametrize("stops", [(), ("zz-not-there",)])
def test_stream_chunks_concatenate_to_generate_text(gen: Generator, stops: tuple[str, ...]) -> None:
    params = _greedy(32, stop_sequences=stops)
    expected = gen.generate(PROMPT, params)

    chunks = list(gen.stream(PROMPT, params))

    assert "".join(c.text for c in chunks) == expected.candidates[0].text
    assert all(c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason is expected.candidates[0].finish_reason
    assert last.output_token_count == expected.candidates[0].token_count
    assert last.prompt_token_count == expected.prompt_token_count


def test_stream_never_shows_the_stop_sequence(gen: Generator) -> None:
    full = gen.generate(PROMPT, _greedy(24)).candidates[0].text
    stop = full[10:14]
    chunks = list(gen.stream(PROMPT, _greedy(24, stop_sequences=(stop,))))
    assert "".join(c.text for c in chunks) == full[: full.index(stop)]
    assert chunks[-1].finish_reason is FinishReason.STOP


def test_stream_rejects_several_candidates(gen: Generator) -> None:
    with pytest.raises(InvalidArgument, match="candidateCount"):
        gen.stream(PROMPT, _greedy(4, candidate_count=2))


def test_count_tokens_includes_template_only_with_adapter(
    gen: Generator, base: LoadedBase, adapter_dir: Path
) -> None:
    assert gen.count_tokens(PROMPT) == len(base.tokenizer(PROMPT).input_ids)
    templated = len(base.tokenizer(format_prompt(PROMPT)).input_ids)
    assert gen.count_tokens(PROMPT, adapter_dir) == templated


def test_adapter_changes_output_and_base_output_returns_without_it(
    tiny_model_path: Path, adapter_dir: Path
) -> None:
    base = _load(tiny_model_path)
    gen = Generator(base)
    params = _greedy(12)
    plain = gen.generate(format_prompt(PROMPT), params).candidates[0].text

    tuned = gen.generate(PROMPT, params, adapter_dir).candidates[0].text
    again_base = gen.generate(format_prompt(PROMPT), params).candidates[0].text
    again_tuned = gen.generate(PROMPT, params, adapter_dir).candidates[0].text

    assert tuned != plain.removeprefix(" ")
    assert again_base == plain
    assert again_tuned == tuned


@pytest.mark.parametrize("backend", [Backend.FAST, Backend.REFERENCE])
def test_adapters_are_loaded_once_and_evicted_lru(
    tiny_model_path: Path, adapter_dir: Path, tmp_path: Path, backend: Backend
) -> None:
    import shutil

    second = tmp_path / "second"
    shutil.copytree(adapter_dir, second)
    gen = Generator(_load(tiny_model_path), max_adapters=1, backend=backend)
    params = _greedy(4)
    first_text = gen.generate(PROMPT, params, adapter_dir).candidates[0].text
    gen.generate(PROMPT, params, second)
    if backend is Backend.FAST:
        assert list(gen._loras) == [second.resolve()]  # the first was evicted
        assert gen._peft is None  # the fast path never builds PEFT modules
    else:
        assert set(gen._peft.peft_config) == {"tuned_1"}
        assert not gen._loras
    assert gen.generate(PROMPT, params, adapter_dir).candidates[0].text == first_text


def test_fast_adapter_is_one_fp32_copy_of_the_file(
    tiny_model_path: Path, adapter_dir: Path
) -> None:
    from safetensors.torch import load_file

    gen = Generator(_load(tiny_model_path))
    gen.generate(PROMPT, _greedy(2), adapter_dir)
    ((_, lora),) = gen._loras.values()
    assert lora is not None
    params = sum(t.numel() for t in load_file(adapter_dir / "adapter_model.safetensors").values())
    assert lora.nbytes == 4 * params  # fp32 as PEFT keeps it; no padding, no second copy


def test_an_adapter_the_fast_path_cannot_run_falls_back_to_peft(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    config.init_lora_weights = False
    get_peft_model(_load(tiny_model_path).model, config).save_pretrained(tmp_path / "dora")
    ref = Generator(_load(tiny_model_path), backend=Backend.REFERENCE)
    fast = Generator(_load(tiny_model_path))

    text = fast.generate(PROMPT, _greedy(8), tmp_path / "dora").candidates[0].text

    assert text == ref.generate(PROMPT, _greedy(8), tmp_path / "dora").candidates[0].text
    assert fast._peft is not None and list(fast._loras.values())[0][1] is None


def test_an_adapter_that_does_not_fit_the_base_is_a_clear_error(
    tiny_model_path: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "tuned" / "adapter"
    shutil.copytree(adapter_dir, bad)
    weights = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("lora_A.weight"))
    weights[key] = weights[key][:, :-1].contiguous()  # one input feature short
    save_file(weights, bad / "adapter_model.safetensors")
    gen = Generator(_load(tiny_model_path))

    with pytest.raises(FailedPrecondition, match="adapter files of tuned are damaged"):
        gen.generate(PROMPT, _greedy(2), bad)
    assert gen.generate(PROMPT, _greedy(2), adapter_dir).candidates  # others still serve


def test_text_stream_keeps_multibyte_characters_whole_and_holds_stop_prefixes(
    base: LoadedBase,
) -> None:
    from tunery.engine.generate import _TextStream

    tok = base.tokenizer
    cat = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "🐱".encode()]  # byte fallback
    word = tok(" héllo", add_special_tokens=False).input_ids
    ids = word + cat + word

    plain = _TextStream(tok, GenerationParams(), strip_prefix=False)
    pieces = [plain.push(i, is_eos=False) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == " héllo🐱 héllo"
    assert "🐱" in pieces and not any("\ufffd" in p for p in pieces)

    stopping = _TextStream(tok, GenerationParams(stop_sequences=("llo🐱",)), strip_prefix=True)
    pieces = [stopping.push(i, is_eos=False) for i in ids[: len(word) + len(cat)]]
    assert "".join(pieces) == stopping.text == "hé"  # template's leading space stripped too
    assert stopping.finish_reason is FinishReason.STOP
