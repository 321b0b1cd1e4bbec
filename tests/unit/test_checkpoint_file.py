"""The checkpoint file: a training state written and read back whole, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tunery.engine.checkpoint_file import read_state, write_state


def _state() -> dict[str, object]:
    g = torch.Generator().manual_seed(3)
    return {
        "step": 12,
        "adapter": {"a": torch.randn(16, 640, generator=g), "b": torch.randn(640, 16)[:, :8]},
        "optimizer": {
            "state": {0: {"step": torch.tensor(12.0), "exp_avg": torch.randn(3, 4, generator=g)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}],
        },
        "rng": torch.get_rng_state(),
        "extra": [torch.zeros(0), torch.arange(5, dtype=torch.int64), torch.ones(2).bfloat16()],
    }


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))  # type: ignore[arg-type]
    return a == b


def test_a_state_reads_back_as_it_was_written(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "state.bin"
    with open(path, "wb") as f:
        write_state(f, state)
    back = read_state(path)
    assert _same(state, back)
    back["adapter"]["a"].add_(1)  # each tensor its own memory: the optimizer writes into them
    assert not torch.equal(back["adapter"]["a"], state["adapter"]["a"])  # type: ignore[index]


def test_a_file_cut_short_or_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    with open(path, "wb") as f:
        write_state(f, _state())
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="cut short"):
        read_state(path)
    path.write_bytes(b"stale")
    with pytest.raises(ValueError, match="not a checkpoint"):
        read_state(path)
