"""The LoRA loop on a tiny real model: reports, checkpoints, resume, cancellation, determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunery.engine.base_models import BaseModelRegistry, LoadedBase
from tunery.engine.specs import Example, StepReport, StopReason, TrainSpec
from tunery.engine.train import CHECKPOINT_DIR, total_steps, train
from tunery.errors import InvalidArgument

EXAMPLES = [Example(str(i), str(i + 1)) for i in range(10)]
SPEC = TrainSpec(epoch_count=4, batch_size=3, learning_rate=0.01, seed=7)


@pytest.fixture
def tiny(data_dir: Path) -> LoadedBase:
    return BaseModelRegistry(data_dir / "base_models").load("tiny-gemma")


def _adapter(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(Path(path) / "adapter_model.safetensors")


def test_reports_every_step_with_epochs_and_total(tiny: LoadedBase, tmp_path: Path) -> None:
    reports: list[StepReport] = []
    result = train(tiny, EXAMPLES, SPEC, tmp_path / "run", on_step=reports.append)

    assert result.stop_reason is StopReason.COMPLETED
    assert result.total_steps == total_steps(len(EXAMPLES), SPEC) == 4 * 4
    assert [r.step for r in reports] == list(range(1, 17))
    assert [r.epoch for r in reports] == [e for e in range(1, 5) for _ in range(4)]
    assert all(r.total_steps == 16 and r.mean_loss > 0 for r in reports)
    assert reports[-1].mean_loss < reports[0].mean_loss
    adapter = Path(result.adapter_dir or "")
    assert (adapter / "adapter_config.json").exists()
    assert _adapter(adapter)
    assert not (tmp_path / "run" / CHECKPOINT_DIR).exists()


def test_resume_after_epoch_two_matches_an_uninterrupted_run(
    tiny: LoadedBase, tmp_path: Path
) -> None:
    full = train(tiny, EXAMPLES, SPEC, tmp_path / "full")

    steps: list[int] = []
    stop_after = 2 * 4  # two epochs of 4 steps
    first = train(
        tiny,
        EXAMPLES,
        SPEC,
        tmp_path / "split",
        on_step=lambda r: steps.append(r.step),
        should_stop=lambda: len(steps) >= stop_after,
    )
    assert first.stop_reason is StopReason.CANCELLED and first.steps_done == stop_after
    assert (tmp_path / "split" / CHECKPOINT_DIR).exists()

    resumed_steps: list[int] = []
    second = train(
        tiny, EXAMPLES, SPEC, tmp_path / "split", on_step=lambda r: resumed_steps.append(r.step)
    )
    assert second.stop_reason is StopReason.COMPLETED
    assert resumed_steps == list(range(stop_after + 1, 17))

    a, b = _adapter(full.adapter_dir or ""), _adapter(second.adapter_dir or "")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_same_seed_gives_the_same_adapter_and_base_is_left_clean(
    tiny: LoadedBase, tmp_path: Path
) -> None:
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    one = train(tiny, EXAMPLES, SPEC, tmp_path / "one")
    two = train(tiny, EXAMPLES, SPEC, tmp_path / "two")
    for key, value in _adapter(one.adapter_dir or "").items():
        torch.testing.assert_close(value, _adapter(two.adapter_dir or "")[key])
    after = tiny.model.state_dict()
    assert after.keys() == before.keys()  # no LoRA layers left behind
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cancel_before_the_first_step_writes_no_adapter(tiny: LoadedBase, tmp_path: Path) -> None:
    result = train(tiny, EXAMPLES, SPEC, tmp_path / "run", should_stop=lambda: True)
    assert result.stop_reason is StopReason.CANCELLED
    assert result.steps_done == 0 and result.adapter_dir is None
    assert not (tmp_path / "run" / "adapter").exists()


def test_validation_loss_is_reported_at_epoch_ends(tiny: LoadedBase, tmp_path: Path) -> None:
    spec = TrainSpec(epoch_count=2, batch_size=4, learning_rate=0.01, validation_fraction=0.2)
    reports: list[StepReport] = []
    train(tiny, EXAMPLES, spec, tmp_path / "run", on_step=reports.append)
    assert total_steps(len(EXAMPLES), spec) == 2 * 2  # 8 train examples, 2 held out
    with_val = [r.step for r in reports if r.validation_loss is not None]
    assert with_val == [2, 4]


def test_no_examples_is_a_clear_error(tiny: LoadedBase, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="no examples"):
        train(tiny, [], SPEC, tmp_path / "run")


def test_a_model_without_mlp_projection_names_trains_its_attention_projections(
    data_dir: Path, tiny_model_path: Path, tmp_path: Path
) -> None:
    """The default LoRA targets the MLP projections by their Llama/Gemma names; a model that has
    none of them (OPT: fc1/fc2) gets its attention projections instead, and the saved adapter
    says so, so PEFT and the generator load it."""
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from tunery.engine.generate import Generator
    from tunery.engine.specs import GenerationParams

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        word_embed_proj_dim=16,
        ffn_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    source = tmp_path / "tiny-opt"
    OPTForCausalLM(config).save_pretrained(source)
    tokenizer.save_pretrained(source)
    registry = BaseModelRegistry(data_dir / "base_models")
    registry.register("tiny-opt", source)
    base = registry.load("tiny-opt")

    examples = [Example("1", "2"), Example("3", "4")]
    result = train(base, examples, TrainSpec(epoch_count=1, batch_size=2), tmp_path / "job")

    assert result.stop_reason is StopReason.COMPLETED
    keys = _adapter(result.adapter_dir or "")
    assert any(".q_proj.lora_A" in k for k in keys)
    assert any(".out_proj.lora_B" in k for k in keys)
    assert not any(".fc1." in k or ".fc2." in k for k in keys)
    text = Generator(base).generate("1", GenerationParams(max_output_tokens=3), result.adapter_dir)
    assert text.candidates[0].token_count >= 1
