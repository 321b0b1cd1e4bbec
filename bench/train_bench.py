"""Training speed: Tunery's LoRA loop vs TRL's SFTTrainer + PEFT, in one process, on the seed
tutorial's 15 examples (5 epochs, batch 4, learning rate 0.001).

Both sides get the same LoRA config (`TrainSpec().lora`), epochs, batch size, AdamW step size
(`tunery.engine.train.optimizer_lr`), warmup steps, grad clip, and the same prompt/completion text
(`tunery.engine.data`), with loss on the completion only. TRL runs in fp32 by default: on a CPU its
own default (`bf16=True`) refuses to start unless `use_cpu=True`; `--trl-bf16` adds a bf16-autocast
run. Trained tokens are counted once, with Tunery's tokenization, so tokens/s compare like for like.

    python bench/train_bench.py [--data-dir DIR] [--trl-bf16] [--threads N] [--warm 3]

Needs TRL (not a runtime dependency): see bench/README.md. The last line is the ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from heldout import SEED_EXAMPLES

from tunery.engine.base_models import DEFAULT_BASE_MODEL, BaseModelRegistry, LoadedBase
from tunery.engine.data import OUTPUT_PREFIX, format_prompt, tokenize_example
from tunery.engine.specs import Example, TrainSpec
from tunery.engine.train import (
    GRAD_CLIP,
    WARMUP_FRACTION,
    optimizer_lr,
    total_steps,
    train,
)
from tunery.settings import Settings

OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class Run:
    """One side's result: wall and CPU time of the training call, and its last step's loss."""

    name: str
    seconds: float
    cpu_seconds: float  # this process's CPU time: less skewed than wall time on a busy machine
    final_loss: float


class Stopwatch:
    """Wall and process CPU time since it was made."""

    def __init__(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self._wall, time.process_time() - self._cpu


def run_tunery(
    base: LoadedBase, examples: list[Example], spec: TrainSpec, work: Path, label: str
) -> Run:
    """Tunery's `train()`, timed whole (tokenization, checkpoints and adapter save included)."""
    losses: list[float] = []
    watch = Stopwatch()
    train(base, examples, spec, work / "tunery", on_step=lambda r: losses.append(r.mean_loss))
    name = f"tunery {label} ({str(base.dtype).removeprefix('torch.')})"
    return Run(name, *watch.read(), losses[-1])


def run_trl(
    model_dir: Path, examples: list[Example], spec: TrainSpec, work: Path, bf16: bool
) -> Run:
    """TRL's SFTTrainer on a fresh fp32 copy of the same weights; times `trainer.train()` only."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [
        {"prompt": format_prompt(e.text_input), "completion": OUTPUT_PREFIX + e.output}
        for e in examples
    ]
    steps = total_steps(len(examples), spec)
    config = SFTConfig(
        output_dir=str(work / f"trl-{'bf16' if bf16 else 'fp32'}"),
        num_train_epochs=spec.epoch_count,
        per_device_train_batch_size=spec.batch_size,
        learning_rate=optimizer_lr(spec),
        lr_scheduler_type="linear",  # Tunery decays to 10% of peak, TRL to 0: same work per step
        warmup_steps=max(1, int(steps * WARMUP_FRACTION)),
        weight_decay=0.0,
        max_grad_norm=GRAD_CLIP,
        max_length=spec.max_seq_len,
        completion_only_loss=True,
        bf16=bf16,
        use_cpu=True,
        # TRL turns this on by default to save memory; at 270M it only costs time, so off.
        activation_checkpointing=False,
        seed=spec.seed,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
    )
    lora = LoraConfig(
        r=spec.lora.rank,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=list(spec.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
    )
    watch = Stopwatch()
    trainer.train()
    seconds, cpu_seconds = watch.read()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert trainer.state.global_step == steps, (trainer.state.global_step, steps)
    return Run(f"trl ({'bf16 autocast' if bf16 else 'float32'})", seconds, cpu_seconds, losses[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="default: TUNERY_DATA_DIR")
    parser.add_argument("--trl-bf16", action="store_true", help="also time TRL with bf16 autocast")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--warm", type=int, default=3, help="warm runs of Tunery (their median is compared)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in OFFLINE:  # the benches never touch the network
        os.environ[name] = "1"
    settings = Settings(data_dir=args.data_dir) if args.data_dir else Settings()

    registry = BaseModelRegistry(settings.models_dir, device=settings.device)
    base = registry.load(DEFAULT_BASE_MODEL)
    examples = [Example(i, o) for i, o in SEED_EXAMPLES]
    spec = TrainSpec(epoch_count=5, batch_size=4, learning_rate=0.001)
    per_epoch = sum(
        len(tokenize_example(base.tokenizer, e, spec.max_seq_len).input_ids) for e in examples
    )
    tokens = per_epoch * spec.epoch_count
    print(
        f"{len(examples)} examples, {spec.epoch_count} epochs, batch {spec.batch_size}, "
        f"{total_steps(len(examples), spec)} steps, LoRA r={spec.lora.rank} a={spec.lora.alpha}, "
        f"AdamW lr {optimizer_lr(spec):g}; {tokens} trained tokens; "
        f"{torch.get_num_threads()} threads, cpu {torch.backends.cpu.get_cpu_capability()}"
    )

    with tempfile.TemporaryDirectory(prefix="tunery-bench-") as tmp:
        work = Path(tmp)
        # The first run in a process also packs the base weights for training (once per process;
        # a server's workers do it when they preload) and warms oneDNN up; the later ones are what
        # every later job on a warm worker costs (the median of `--warm` runs: a run is 20 steps of
        # ~0.1 s on a noisy machine). TRL's time likewise leaves out its set-up.
        cold = run_tunery(base, examples, spec, work / "cold", "cold")
        warm = [
            run_tunery(base, examples, spec, work / f"warm{k}", "warm") for k in range(args.warm)
        ]
        print("tunery warm runs:", ", ".join(f"{r.seconds:.2f}" for r in warm), "s wall")
        runs = [sorted(warm, key=lambda r: r.seconds)[len(warm) // 2], cold]  # the median warm
        runs.append(run_trl(base.model_dir, examples, spec, work, bf16=False))
        if args.trl_bf16:
            runs.append(run_trl(base.model_dir, examples, spec, work, bf16=True))
    for run in runs:
        print(
            f"{run.name:<22} {run.seconds:8.2f} s wall {run.cpu_seconds:8.2f} s cpu"
            f"  {tokens / run.seconds:7.1f} trained tokens/s  final loss {run.final_loss:.3f}"
        )
    ratio = runs[0].seconds / runs[2].seconds
    verdict = "meets" if ratio <= 1 / 6 else "misses"
    print(f"ratio tunery (warm)/trl time: {ratio:.3f} ({verdict} the target of 1/6 = 0.167)")


if __name__ == "__main__":
    main()
