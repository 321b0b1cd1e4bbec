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
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()
    settings = Settings(**({"data_dir": args.data_dir} if args.data_dir else {}))
    torch.set_num_threads(os.cpu_count() or 1)

    base = BaseModelRegistry(settings.models_dir).load("gemma-3-270m")
    work = Path(tempfile.mkdtemp(prefix="tunery-quality-"))
    try:
        start = time.perf_counter()
        result = train(
            base,
            [Example(i, o) for i, o in SEED_EXAMPLES],
            TrainSpec(epoch_count=5, batch_size=4, learning_rate=0.001),
            work,
        )
        print(f"train: {time.perf_counter() - start:.2f} s, {result.steps_done} steps")
        gen = Generator(base)
        params = GenerationParams(max_output_tokens=16)
        adapter = Path(result.adapter_dir or "")
        cases = heldout_cases(args.cases)
        print(f"'III' -> {gen.generate('III', params, adapter).candidates[0].text!r}")
        for label, adapter_dir in (("tuned", adapter), ("base", None)):
            hits = dict.fromkeys(KINDS, 0)
            for k, (question, answer) in enumerate(cases):
                text = gen.generate(question, params, adapter_dir).candidates[0].text.strip()
                hits[KINDS[k % 3]] += text == answer
            per_kind = "  ".join(
                f"{kind} {hits[kind]}/{len(cases[i::3])}" for i, kind in enumerate(KINDS)
            )
            total = sum(hits.values())
            print(f"{label}: {per_kind}  exact {total}/{len(cases)} = {total / len(cases):.0%}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
