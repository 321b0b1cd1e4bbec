"""Held-out quality of the seed recipe: tune on the seed tutorial's 15 examples with its
hyperparameters, then answer generated cases of the same kind (digits, words, Roman numerals).

    python bench/quality_bench.py [--cases 60] [--data-dir DIR]

Prints the exact-match rate per kind and overall (last line), next to the untuned base model's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from heldout import SEED_EXAMPLES, heldout_cases  # noqa: E402

from tunery.engine.base_models import BaseModelRegistry  # noqa: E402
from tunery.engine.generate import Generator  # noqa: E402
from tunery.engine.specs import Example, GenerationParams, TrainSpec  # noqa: E402
from tunery.engine.train import train  # noqa: E402
from tunery.settings import Settings  # noqa: E402

KINDS = ("digits", "words", "roman")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    parser.add_argument("--skip-base", action="store_true", help="do not score the base model")
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()
    settings = Settings(**({"data_dir": args.data_dir} if args.data_dir else {}))
    torch.set_num_threads(os.cpu_count() or 1)

    base = BaseModelRegistry(settings.models_dir).load("gemma-3-270m")
    gen = Generator(base)
    params = GenerationParams(max_output_tokens=16)
    cases = heldout_cases(args.cases)

    def score(label: str, adapter_dir: Path | None) -> float:
        hits = dict.fromkeys(KINDS, 0)
        for k, (question, answer) in enumerate(cases):
            text = gen.generate(question, params, adapter_dir).candidates[0].text.strip()
            hits[KINDS[k % 3]] += text == answer
        per_kind = "  ".join(
            f"{kind} {hits[kind]}/{len(cases[i::3])}" for i, kind in enumerate(KINDS)
        )
        total = sum(hits.values())
        print(f"{label}: {per_kind}  exact {total}/{len(cases)} = {total / len(cases):.0%}")
        return total / len(cases)

    if not args.skip_base:
        score("base", None)
    rates = []
    for seed in args.seeds:
        work = Path(tempfile.mkdtemp(prefix="tunery-quality-"))
        try:
            start = time.perf_counter()
            result = train(
                base,
                [Example(i, o) for i, o in SEED_EXAMPLES],
                TrainSpec(epoch_count=5, batch_size=4, learning_rate=0.001, seed=seed),
                work,
            )
            print(
                f"seed {seed} train: {time.perf_counter() - start:.2f} s, {result.steps_done} steps"
            )
            adapter = Path(result.adapter_dir or "")
            print(f"'III' -> {gen.generate('III', params, adapter).candidates[0].text!r}")
            rates.append(score(f"tuned (seed {seed})", adapter))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"tuned exact, mean over seeds {args.seeds}: {sum(rates) / len(rates):.1%}")


if __name__ == "__main__":
    main()
