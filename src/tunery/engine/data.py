"""Training data for causal LMs: the prompt template, tokenization with output-only labels, batches.

A tuned model sees `format_prompt(text_input)` and learns to answer with `output` followed by EOS,
so generation stops by itself. Loss is on output tokens (and EOS) only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from tunery.engine.specs import Example

IGNORE_INDEX = -100

# Plain-text turns suit a pretrained (not instruction-tuned) base: the words carry meaning the
# model already knows, unlike untrained chat-control tokens.
PROMPT_TEMPLATE = "Input: {text_input}\nOutput:"
OUTPUT_PREFIX = " "


def format_prompt(text_input: str) -> str:
    """The text a tuned model is conditioned on, at training and at inference alike."""
    return PROMPT_TEMPLATE.format(text_input=text_input)


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: tuple[int, ...]
    prompt_len: int  # positions [0, prompt_len) are prompt; the rest are labels

    @property
    def label_count(self) -> int:
        return len(self.input_ids) - self.prompt_len


def encode_prompt(tokenizer: Any, text_input: str) -> list[int]:
    """Prompt token ids (BOS included), as both training and generation use them."""
    ids: list[int] = tokenizer(format_prompt(text_input))["input_ids"]
    return ids


def tokenize_example(tokenizer: Any, example: Example, max_seq_len: int) -> TokenizedExample:
    prompt = encode_prompt(tokenizer, example.text_input)
    answer: list[int] = tokenizer(OUTPUT_PREFIX + example.output, add_special_tokens=False)[
        "input_ids"
    ]
    answer = answer[: max_seq_len - 2] + [tokenizer.eos_token_id]
    room = max_seq_len - len(answer)
    if len(prompt) > room:
        # Keep BOS and the end of the prompt (the template's tail says where the answer starts).
        prompt = prompt[:1] + prompt[len(prompt) - room + 1 :]
    return TokenizedExample(tuple(prompt + answer), len(prompt))


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    label_positions: torch.Tensor  # (N,) flat indices into B*T of positions predicting a label
    labels: torch.Tensor  # (N,) the token each of those positions must predict

    @property
    def label_count(self) -> int:
        return int(self.labels.numel())


def collate(examples: Sequence[TokenizedExample], pad_id: int, device: torch.device) -> Batch:
    """Right-pad a batch and list only the positions that predict output tokens."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    positions: list[int] = []
    labels: list[int] = []
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        mask[row, :n] = 1
        # position t predicts token t+1: label tokens sit at [prompt_len, n)
        for t in range(ex.prompt_len - 1, n - 1):
            positions.append(row * width + t)
            labels.append(ex.input_ids[t + 1])
    return Batch(
        ids.to(device),
        mask.to(device),
        torch.tensor(positions, dtype=torch.long, device=device),
        torch.tensor(labels, dtype=torch.long, device=device),
    )


@dataclass(frozen=True)
class PackedBatch:
    """A batch's examples end to end in one row: no padding; attention stays within a segment."""

    input_ids: torch.Tensor  # (T,) long
    positions: torch.Tensor  # (T,) each token's position inside its own example
    segments: torch.Tensor  # (T,) which example a token belongs to
    label_positions: torch.Tensor  # (N,) indices into T of positions predicting a label
    labels: torch.Tensor  # (N,)
    bounds: tuple[tuple[int, int], ...]  # each example's [start, end) in the row

    @property
    def label_count(self) -> int:
        return int(self.labels.numel())


def pack(examples: Sequence[TokenizedExample], device: torch.device) -> PackedBatch:
    """Lay `examples` end to end, listing only the positions that predict output tokens."""
    ids: list[int] = []
    positions: list[int] = []
    segments: list[int] = []
    label_positions: list[int] = []
    labels: list[int] = []
    starts: list[int] = []
    for seg, ex in enumerate(examples):
        start, n = len(ids), len(ex.input_ids)
        starts.append(start)
        ids.extend(ex.input_ids)
        positions.extend(range(n))
        segments.extend([seg] * n)
        label_positions.extend(range(start + ex.prompt_len - 1, start + n - 1))
        labels.extend(ex.input_ids[ex.prompt_len :])

    def as_tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return PackedBatch(
        as_tensor(ids),
        as_tensor(positions),
        as_tensor(segments),
        as_tensor(label_positions),
        as_tensor(labels),
        tuple(zip(starts, starts[1:] + [len(ids)], strict=True)),
    )


def padded(batch: PackedBatch, multiple: int, pad_id: int) -> PackedBatch:
    """`batch` with a label-less filler example of `pad_id` tokens at its end, so its row has a
    multiple of `multiple` tokens (the batch itself where it has). The filler attends only to
    itself and predicts nothing: the loss and its gradients are the batch's."""
    t = int(batch.input_ids.shape[0])
    extra = -t % multiple
    if not extra:
        return batch
    ids, positions, segments = batch.input_ids, batch.positions, batch.segments
    filler = torch.full((extra,), pad_id, dtype=ids.dtype, device=ids.device)
    next_segment = int(segments.max()) + 1 if t else 0
    return replace(
        batch,
        input_ids=torch.cat([ids, filler]),
        positions=torch.cat([positions, torch.arange(extra, device=positions.device)]),
        segments=torch.cat([segments, torch.full_like(filler, next_segment)]),
        bounds=(*batch.bounds, (t, t + extra)),
    )


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a function of (seed, epoch) only, so a resume replays it."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return [int(i) for i in torch.randperm(n, generator=gen)]


def validation_count(n_examples: int, fraction: float) -> int:
    """How many of `n_examples` are held out: `fraction` of them, at least 1, never all."""
    if fraction <= 0 or n_examples < 2:
        return 0
    return min(n_examples - 1, max(1, round(n_examples * fraction)))


def split_validation(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out `validation_count` examples, picked by `seed`, for the validation loss."""
    n_val = validation_count(len(examples), fraction)
    if n_val == 0:
        return list(examples), []
    order = epoch_order(len(examples), seed, epoch=-1)
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    return train, val
