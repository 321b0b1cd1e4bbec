"""Greedy picking: one row (numpy's argmax) and many rows (torch's max) agree, ties included."""

from __future__ import annotations

import torch

from tunery.engine.sampling import greedy


def test_one_row_and_many_rows_pick_the_same_first_largest_logit() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 262_144)
    logits[1, 7] = logits[1, 90_000] = logits[1].max() + 1  # a tie: the first index wins
    logits[2, -1] = torch.inf
    many = greedy(logits).tolist()
    one = [int(greedy(logits[i : i + 1])[0]) for i in range(4)]
    assert one == many == torch.argmax(logits, dim=-1).tolist()
    assert many[1] == 7 and many[2] == 262_143
    bf16 = logits[:1].to(torch.bfloat16)  # not float32: torch's max, same answer
    assert int(greedy(bf16)[0]) == int(torch.argmax(bf16.float()))
