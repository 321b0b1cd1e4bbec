"""The fast decode forward against the transformers one, on the embedded model with a seed-tuned
adapter: bf16 gives the same tokens (up to bf16 ties: its decode attention is a C kernel), int8
and llama.cpp (where llama-cpp-python is installed) the same answers on the seed and held-out
checks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from heldout import SEED_EXAMPLES, heldout_cases  # noqa: E402

from tests.greedy_ties import assert_greedy_up_to_ties, fast_tokens  # noqa: E402
from tunery.engine import llamacpp  # noqa: E402
from tunery.engine.base_models import DEFAULT_BASE_MODEL, BaseModelRegistry  # noqa: E402
from tunery.engine.generate import Backend, Generator  # noqa: E402
from tunery.engine.specs import Example, GenerationParams, TrainSpec  # noqa: E402
from tunery.engine.train import train  # noqa: E402

pytestmark = pytest.mark.e2e

CASES = [("III", "IV"), *heldout_cases(9)]
PROMPTS = [question for question, _ in CASES]
BASE_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a"]


@pytest.fixture(scope="module")
def adapter(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = BaseModelRegistry(models_dir).load(DEFAULT_BASE_MODEL)
    examples = [Example(i, o) for i, o in SEED_EXAMPLES]
    spec = TrainSpec(epoch_count=5, batch_size=4, learning_rate=0.001)
    result = train(base, examples, spec, tmp_path_factory.mktemp("seed"))
    assert result.adapter_dir is not None
    return Path(result.adapter_dir)


@pytest.fixture(scope="module")
def generators(models_dir: Path) -> dict[Backend, Generator]:
    # Each Generator owns its model (PEFT wraps it in place): one load per backend.
    return {
        backend: Generator(BaseModelRegistry(models_dir).load(DEFAULT_BASE_MODEL), backend=backend)
        for backend in Backend
        if backend is not Backend.LLAMA_CPP  # its own test, where llama-cpp-python is installed
    }


def _answers(gen: Generator, prompts: list[str], adapter: Path | None, n: int) -> list[str]:
    params = GenerationParams(max_output_tokens=n)
    return [gen.generate(p, params, adapter).candidates[0].text for p in prompts]


def _same_up_to_ties(
    generators: dict[Backend, Generator], prompts: list[str], adapter: Path | None, n: int
) -> list[str]:
    """The fast backend's answers, checked against the reference's: the same text, or (where
    they part) fast's greedy tokens are each the reference model's best up to how far two bf16
    forwards part (its kernels round in another order, in every layer: see `greedy_ties`)."""
    fast, reference = generators[Backend.FAST], generators[Backend.REFERENCE]
    answers = _answers(fast, prompts, adapter, n)
    want = _answers(reference, prompts, adapter, n)
    parted = [k for k, (a, b) in enumerate(zip(answers, want, strict=True)) if a != b]
    if parted:
        from peft import PeftModel

        models_dir = Path(reference._base.model_dir).parent
        model = BaseModelRegistry(models_dir).load(DEFAULT_BASE_MODEL).model
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter)
        params = GenerationParams(max_output_tokens=n)
        for k in parted:
            ids, tokens = fast_tokens(fast, prompts[k], params, adapter)
            assert_greedy_up_to_ties(model, ids, tokens)
    return answers


def test_tuned_answers_match_the_reference(
    generators: dict[Backend, Generator], adapter: Path
) -> None:
    """bf16 gives the reference's tokens up to bf16 ties, checked token by token where an answer
    parts. A held-out prompt whose first digit is a near-tie for the tuned model may then land
    either way (seen: "-27" for the reference's "-38", within two bf16 steps), so the score must
    match within one answer, as for int8 and llama.cpp; the seed check holds exactly."""
    reference = _answers(generators[Backend.REFERENCE], PROMPTS, adapter, 16)
    assert reference[0] == "IV"
    fast = _same_up_to_ties(generators, PROMPTS, adapter, 16)
    assert fast[0] == "IV" and _correct(fast) >= _correct(reference) - 1, (fast, reference)


def _correct(answers: list[str]) -> int:
    return sum(a.strip() == want for a, (_, want) in zip(answers, CASES, strict=True))


def test_int8_answers_are_as_good_as_the_reference(
    generators: dict[Backend, Generator], adapter: Path
) -> None:
    """int8 weights are lossy: where the reference's top two tokens nearly tie, int8 may pick
    the other (seen: "3,171,752" for the reference's "3,171,751"), so it must score as well on the
    held-out check, within one answer, rather than match token for token. As well or better: a
    near-tie may as well fall the right way (seen with llama.cpp: "-38" where the reference said
    "-27")."""
    reference = _answers(generators[Backend.REFERENCE], PROMPTS, adapter, 16)
    int8 = _answers(generators[Backend.FAST_INT8], PROMPTS, adapter, 16)
    assert int8[0] == "IV"
    assert _correct(int8) >= _correct(reference) - 1, (int8, reference)


@pytest.mark.skipif(not llamacpp.installed(), reason="llama-cpp-python (the llamacpp extra)")
def test_llama_cpp_answers_are_as_good_as_the_reference(
    generators: dict[Backend, Generator], adapter: Path, models_dir: Path
) -> None:
    """llama.cpp runs the Q4_K_M file itself, with its own (8-bit) activations: as int8, it must
    score as well as the reference, within one answer, and answer "IV"; streaming gives the same
    text. The adapter really went through llama.cpp: its GGUF LoRA was written."""
    llama = Generator(BaseModelRegistry(models_dir).load(DEFAULT_BASE_MODEL), backend="llama-cpp")
    base_before = _answers(llama, BASE_PROMPTS[:1], None, 16)
    reference = _answers(generators[Backend.REFERENCE], PROMPTS, adapter, 16)
    answers = _answers(llama, PROMPTS, adapter, 16)
    assert (adapter / llamacpp.ADAPTER_GGUF).exists()
    assert answers[0] == "IV"
    assert _correct(answers) >= _correct(reference) - 1, (answers, reference)
    params = GenerationParams(max_output_tokens=16)
    assert "".join(c.text for c in llama.stream(PROMPTS[1], params, adapter)) == answers[1]
    # The base model again: the adapter is switched off, not left applied.
    assert _answers(llama, BASE_PROMPTS[:1], None, 16) == base_before


def test_base_model_bf16_tokens_match_the_reference(generators: dict[Backend, Generator]) -> None:
    _same_up_to_ties(generators, BASE_PROMPTS, None, 32)


def test_streamed_and_batched_candidates_match(
    generators: dict[Backend, Generator], adapter: Path
) -> None:
    params = GenerationParams(max_output_tokens=12, candidate_count=3, temperature=0.8, seed=7)
    ref = generators[Backend.REFERENCE].generate("XIV", params, adapter)
    fast = generators[Backend.FAST].generate("XIV", params, adapter)
    assert [c.text for c in fast.candidates] == [c.text for c in ref.candidates]
    greedy = GenerationParams(max_output_tokens=8)
    streamed = "".join(c.text for c in generators[Backend.FAST].stream("XIV", greedy, adapter))
    reference = generators[Backend.REFERENCE].generate("XIV", greedy, adapter)
    assert streamed == reference.candidates[0].text


@pytest.mark.skipif(not llamacpp.installed(), reason="llama-cpp-python (the llamacpp extra)")
def test_llama_cpp_prompt_lookup_gives_the_same_tokens_in_fewer_forwards(models_dir: Path) -> None:
    """Greedy tokens with prompt-lookup drafts are the tokens one at a time; where the output
    repeats (this prompt makes the base model loop), several come out of each forward. Where it
    does not, the drafts stay off. `max_tokens` holds mid-draft, and closing the iterator early
    leaves the model ready for the next request."""
    base = BaseModelRegistry(models_dir).load(DEFAULT_BASE_MODEL)
    gguf = base.gguf()
    assert gguf is not None
    model = llamacpp.LlamaCppModel(gguf, context=512)
    looping = base.tokenizer("Write a short story about a robot.")["input_ids"]
    plain = base.tokenizer("The capital of France is")["input_ids"]
    try:
        for ids, n in ((looping, 96), (plain, 32), (looping, 37)):
            before = model.forwards
            alone = list(model.greedy(ids, n, lookup=False))
            one_at_a_time = model.forwards - before
            before = model.forwards
            drafted = list(model.greedy(ids, n))
            assert drafted == alone
            assert len(alone) == n  # neither prompt ends early
            if ids is looping:  # drafts start once the loop has shown itself (~20 tokens)
                assert model.forwards - before < (one_at_a_time / 2 if n > 64 else one_at_a_time)
        tokens = model.greedy(looping, 96)
        first = [next(tokens) for _ in range(40)]
        tokens.close()
        assert list(model.greedy(looping, 40)) == first
    finally:
        model.close()
