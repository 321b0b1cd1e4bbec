"""Checking greedy tokens against the reference forward where bf16 rounding may decide ties.

Two forwards that round differently (another attention kernel, another matmul blocking) pick the
same greedy tokens except where the two best logits are within a rounding step of each other;
there either pick is right. So a fast path's tokens are checked by feeding them through the
transformers model (teacher forcing) and asking, at each step, how far the picked token's logit
is below the best one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunery.engine.generate import Generator
from tunery.engine.specs import GenerationParams

# How far below the best logit a picked token may lie, relative to it: 2^-6, four bf16 steps at
# the bottom of a binade. Not one rounding of the head's output per side: the two forwards round
# differently in each of the 18 layers, and on the embedded model with a seed-tuned adapter the
# fast decode's top-two margin parts from the reference's by up to 1.29% (old training code's
# adapter: 1.41%) of the best logit, over 199 teacher-forced decode positions of 41 held-out
# prompts (median 0-0.3%, p99 1.24-1.37%). The 0.78% used before failed on an adapter whose
# answer to "one thousand four hundred seventy nine" turned on a 0.375 margin at a best of 30.25.
TIE_STEPS = 2**-6


def fast_tokens(
    gen: Generator, prompt: str, params: GenerationParams, adapter: Path | None
) -> tuple[list[int], list[int]]:
    """The prompt's ids and the greedy token ids the generator's batch scheduler decodes."""
    ids = gen._encode(prompt, adapter)
    route = gen._batch_route(params, adapter)
    assert route is not None, "not a batched request"
    return ids, list(route.scheduler.submit(ids, route.lora, params))


@torch.inference_mode()
def worst_gaps(model: Any, prompt_ids: list[int], tokens: list[int]) -> list[float]:
    """For each picked token, (best logit − its logit) / |best logit| under `model`."""
    ids = torch.tensor([prompt_ids + tokens[:-1]])
    logits = model(ids).logits[0, len(prompt_ids) - 1 :].float()  # (T, V)
    best = logits.max(dim=-1).values
    picked = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    return ((best - picked) / best.abs().clamp(min=1e-6)).tolist()


def assert_greedy_up_to_ties(model: Any, prompt_ids: list[int], tokens: list[int]) -> None:
    """Every token is the model's best or within `TIE_STEPS` of it."""
    gaps = worst_gaps(model, prompt_ids, tokens)
    assert max(gaps) <= TIE_STEPS, [(t, round(g, 5)) for t, g in enumerate(gaps) if g > 0]
