"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling with a
seeded generator. Shared by the single-stream decode loop and the batch scheduler, so a request
samples the same tokens whichever of them runs it."""

from __future__ import annotations

import secrets

import torch

from tunery.engine.specs import GenerationParams


def pick(
    logits: torch.Tensor, params: GenerationParams, rng: torch.Generator | None
) -> torch.Tensor:
    """(B, V) logits → (B,) next tokens: argmax, or temperature/top-k/top-p sampling."""
    if rng is None:
        return greedy(logits)
    if params.top_k > 0:
        values, index = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1)
        return pick_top(values, index, params, rng)
    logits = logits / params.temperature
    if params.top_p < 1.0:
        values, index = logits.sort(dim=-1, descending=True)
        return _nucleus(values, index, params, rng)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=rng).squeeze(-1)


def pick_top(
    values: torch.Tensor, index: torch.Tensor, params: GenerationParams, rng: torch.Generator
) -> torch.Tensor:
    """Sampling with top-k from each row's k largest logits (B, k), largest first, and their
    tokens (B, k): the same draw as `pick` on the full logits, which need not exist (see
    `FastGemma3.top_logits`)."""
    return _nucleus(values / params.temperature, index, params, rng)


def _nucleus(
    values: torch.Tensor, index: torch.Tensor, params: GenerationParams, rng: torch.Generator
) -> torch.Tensor:
    """A draw from the head of sorted tempered logits (B, n) whose mass reaches top_p."""
    if params.top_p < 1.0:
        probs = values.softmax(dim=-1)
        # Keep the smallest head whose mass reaches top_p (the first token always survives).
        outside = probs.cumsum(dim=-1) - probs >= params.top_p
        values = values.masked_fill(outside, float("-inf"))
    choice = torch.multinomial(values.softmax(dim=-1), 1, generator=rng)  # (B, 1)
    return index.gather(-1, choice).squeeze(-1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) → (B,) index of each row's largest logit, the first of equal ones (as argmax).
    `max` is 2-4x faster than `argmax` over a 262k vocabulary on a CPU (measured: 32 rows of
    bf16, 2.9 vs 13.6 ms)."""
    if logits.shape[0] == 1 and logits.dtype == torch.float32 and logits.device.type == "cpu":
        # One row (a single stream): numpy's argmax, the first of equal ones too, is ~10x faster
        # than torch's max over 262k fp32 logits (12 vs 130 µs a token, measured).
        return torch.tensor([int(logits[0].detach().numpy().argmax())])
    return logits.max(dim=-1).indices


def rng_for(params: GenerationParams, device: torch.device) -> torch.Generator | None:
    """The request's sampling generator (its seed, else a random one); None when greedy."""
    if params.temperature <= 0:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)
