"""Training throughput on mixed lengths: Tunery's packed LoRA loop vs TRL's SFTTrainer + PEFT, in
one process, on a generated 2,000-example dataset whose examples are 10-400 tokens long.

Both sides train one epoch over the same sample of that dataset (`--examples`, default 96: TRL in
fp32 with full-vocabulary logits at every padded position needs minutes per hundred examples here;
`--examples 2000` runs it all) with the same LoRA config, batch size and AdamW step. Trained tokens
are counted once with Tunery's tokenization (no padding), so tokens/s compare like for like.

Tunery's side first does what a server's worker does when it preloads the base model
(`prepare_training`: the frozen weights' training copies), timed and printed apart, as TRL's side
times `trainer.train()` alone and not its setup.

It also prints the model FLOPs Tunery's run needed (forward + input gradients through the frozen
body, 4·N per token, the LoRA and attention terms, and the 262k head at label positions only) over
its wall time, against the matmul peak of the dtype it trains in (bf16, or fp32 on a CPU without
bf16 hardware), measured in the same process; the bf16 peak is printed too. In bf16 the peak is the
best 2048³ rate of oneDNN's matmul and of Tunery's own tiles kernel, each timed before and after
the training.

    python bench/train_throughput_bench.py [--examples 96] [--batch-size 4] [--threads N]

Needs TRL (see bench/README.md). The last line is the ratio of tokens/s.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from train_bench import OFFLINE, Run, Stopwatch, run_trl

from tunery.engine.base_models import DEFAULT_BASE_MODEL, BaseModelRegistry, LoadedBase
from tunery.engine.data import TokenizedExample, tokenize_example
from tunery.engine.fast_train import prepare_training
from tunery.engine.native import NativeKernels
from tunery.engine.specs import Example, LoraSpec, TrainSpec
from tunery.engine.train import prepare_optimizer, train

DATASET_SIZE = 2000
MIN_TOKENS, MAX_TOKENS = 10, 400


def generated_dataset(tokenizer: object, n: int, seed: int = 0) -> list[Example]:
    """`n` input→output pairs of ordinary words, total length uniform in [10, 400] tokens: the
    output is the input's words reversed, so a batch mixes short and long examples."""
    vocab = [
        piece[1:]
        for piece in sorted(tokenizer.get_vocab())  # type: ignore[attr-defined]
        if piece.startswith("▁") and piece[1:].isascii() and piece[1:].isalpha()
        and 3 < len(piece) < 10
    ]  # fmt: skip
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        target = rng.randint(MIN_TOKENS, MAX_TOKENS)
        words = max(1, (target - 9) // 2)  # ~1 token a word, on each side, plus the template
        text = [rng.choice(vocab) for _ in range(words)]
        examples.append(Example(" ".join(text), " ".join(reversed(text))))
    return examples


def best_rate_tflops(product: Callable[[], object], size: int, repeats: int, rounds: int) -> float:
    """The rate of `product` (a size³ matmul), the best of `rounds` timings of `repeats` calls
    (on a noisy VM one timing varied 2.1-2.7 TFLOP/s in bf16; the best is the conservative peak
    to take a share of)."""
    product()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            product()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * repeats / best / 1e12


def matmul_peak_tflops(
    dtype: torch.dtype, size: int = 2048, repeats: int = 10, rounds: int = 3
) -> float:
    """A large matmul's rate in `dtype` on this machine, same threads: the hardware's practical
    peak for it."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    return best_rate_tflops(lambda: a @ b, size, repeats, rounds)


def tiles_peak_tflops(size: int = 2048, repeats: int = 10, rounds: int = 3) -> float:
    """As `matmul_peak_tflops` in bf16, for Tunery's own AMX matmul (`tiles_gemm`, which its
    training runs on): 0 where it does not run here."""
    kernels = NativeKernels.load()
    if kernels is None or not kernels.tiles:
        return 0.0
    a = torch.randn(size, size, dtype=torch.bfloat16)
    packed = kernels.gemm_pack(torch.randn(size, size, dtype=torch.bfloat16))
    if packed is None or kernels.tiles_gemm(a, packed) is None:
        return 0.0
    return best_rate_tflops(lambda: kernels.tiles_gemm(a, packed), size, repeats, rounds)


def bf16_peaks() -> list[float]:
    """The bf16 matmul rates to take the peak from: oneDNN's (torch's) and Tunery's tiles'."""
    return [matmul_peak_tflops(torch.bfloat16), tiles_peak_tflops()]


def model_flops(base: LoadedBase, tokenized: list[TokenizedExample], lora: LoraSpec) -> float:
    """FLOPs one training pass over `tokenized` needs: 4·N per token through the frozen body
    (forward, input gradients), LoRA's 6·r·(in+out) per token and adapted projection, causal
    attention, and the output head at label positions only (forward and input gradient)."""
    config = base.model.config
    body = sum(p.numel() for n, p in base.model.model.named_parameters() if "embed" not in n)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    inter = config.intermediate_size
    sizes = {  # each projection's in + out
        "q_proj": hidden + q, "k_proj": hidden + kv, "v_proj": hidden + kv, "o_proj": q + hidden,
        "gate_proj": hidden + inter, "up_proj": hidden + inter, "down_proj": inter + hidden,
    }  # fmt: skip
    adapted = [m for m in lora.target_modules if m in sizes] or [
        m for m in lora.fallback_modules if m in sizes
    ]
    lora_io = sum(sizes[m] for m in adapted)
    tokens = sum(len(e.input_ids) for e in tokenized)
    labels = sum(e.label_count for e in tokenized)
    # each pair of positions a layer attends (a query and a key at or before it, within a
    # sliding layer's window): QKᵀ and PV forward (2·q each), their four products backward
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * layers
    window = getattr(config, "sliding_window", None)
    pairs = 0
    for kind in kinds:
        reach = window if kind == "sliding_attention" and window else None
        for e in tokenized:
            n = len(e.input_ids)
            pairs += sum(min(i + 1, reach or n) for i in range(n))
    attention = pairs * 12 * q
    head = 4 * labels * config.vocab_size * hidden
    return 4 * body * tokens + 6 * lora.rank * lora_io * layers * tokens + attention + head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=96, help="how many examples both train on")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: TUNERY_DATA_DIR")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--skip-trl", action="store_true", help="Tunery and the peak only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in OFFLINE:
        os.environ[name] = "1"
    from tunery.settings import Settings

    settings = Settings(data_dir=args.data_dir) if args.data_dir else Settings()
    base = BaseModelRegistry(settings.models_dir, device=settings.device).load(DEFAULT_BASE_MODEL)
    spec = TrainSpec(epoch_count=1, batch_size=args.batch_size, learning_rate=0.001)
    dataset = generated_dataset(base.tokenizer, DATASET_SIZE)
    sample = random.Random(1).sample(dataset, min(args.examples, len(dataset)))
    tokenized = [tokenize_example(base.tokenizer, e, spec.max_seq_len) for e in sample]
    lengths = sorted(len(e.input_ids) for e in tokenized)
    all_lengths = [
        len(tokenize_example(base.tokenizer, e, spec.max_seq_len).input_ids) for e in dataset
    ]
    tokens = sum(lengths)
    print(
        f"dataset {len(dataset)} examples, {min(all_lengths)}-{max(all_lengths)} tokens "
        f"(mean {sum(all_lengths) / len(all_lengths):.0f}); training on {len(sample)} of them, "
        f"{tokens} tokens (median {lengths[len(lengths) // 2]}), batch {spec.batch_size}, 1 epoch, "
        f"LoRA r={spec.lora.rank}; {torch.get_num_threads()} threads"
    )
    # The share is of the peak of the dtype Tunery trains in (`pick_dtype`: bf16 where the CPU
    # has AVX512-BF16/AMX, else fp32). Without bf16 hardware a bf16 matmul is emulated, hundreds
    # of times slower: measured small, to show it, and no share of it reported.
    # In bf16 the peak is the best large-matmul rate of the run: oneDNN's and Tunery's own tiles
    # kernel (which beat it at 2048³ here), each measured before and after the training, as the
    # VM's speed drifts (one timing of oneDNN's read 2.3-2.8 TFLOP/s on the same VM in an hour).
    bf16 = base.dtype == torch.bfloat16
    peaks = bf16_peaks() if bf16 else [matmul_peak_tflops(base.dtype)]
    with tempfile.TemporaryDirectory(prefix="tunery-bench-") as tmp:
        work = Path(tmp)
        losses: list[float] = []
        # What a server's worker builds when it preloads the model (`worker._preload`), before any
        # job: timed apart, as TRL's side times `trainer.train()` alone, not its setup.
        preload = Stopwatch()
        prepare_training(base.config, base.weights, base.kernel_cache)
        prepare_optimizer()
        print(f"tunery preload (a worker's, before any job): {preload.read()[0]:.2f} s")
        watch = Stopwatch()
        train(base, sample, spec, work / "tunery", on_step=lambda r: losses.append(r.mean_loss))
        runs = [
            Run(f"tunery ({str(base.dtype).removeprefix('torch.')})", *watch.read(), losses[-1])
        ]
        if bf16:
            peaks += bf16_peaks()
        peak = max(peaks)
        bf16_peak = peak if bf16 else matmul_peak_tflops(torch.bfloat16, 512, 2, 1)
        if not args.skip_trl:
            runs.append(run_trl(base.model_dir, sample, spec, work, bf16=False))
    flops = model_flops(base, tokenized, spec.lora)
    achieved = flops / runs[0].seconds / 1e12
    for run in runs:
        print(
            f"{run.name:<22} {run.seconds:8.2f} s wall {run.cpu_seconds:8.2f} s cpu"
            f"  {tokens / run.seconds:8.1f} trained tokens/s  final loss {run.final_loss:.3f}"
        )
    dtype = str(base.dtype).removeprefix("torch.")
    print(
        f"tunery model FLOPs {flops / 1e12:.2f} T in {runs[0].seconds:.2f} s = {achieved:.3f} "
        f"TFLOP/s; {dtype} matmul peak here {peak:.3f} TFLOP/s -> {achieved / peak:.0%} of it"
        f" (bf16 matmul peak here {bf16_peak:.4f} TFLOP/s)"
    )
    if bf16:
        readings = ", ".join(f"{p:.2f}" for p in peaks)
        print(f"  2048³ bf16 rates (oneDNN, tiles; before, then after): {readings} TFLOP/s")
    if len(runs) > 1:
        print(f"ratio tunery/trl tokens/s: {runs[1].seconds / runs[0].seconds:.2f}")


if __name__ == "__main__":
    main()
