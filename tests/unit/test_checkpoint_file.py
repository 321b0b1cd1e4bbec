"""The checkpoint file: a training state written and read back whole, bit for bit."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import pytest
import torch

from tunery.engine.checkpoint_file import StateImage, _Ref, read_state


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
    StateImage(state).write(path)
    back = read_state(path)
    assert _same(state, back)
    back["adapter"]["a"].add_(1)  # each tensor its own memory: the optimizer writes into them
    assert not torch.equal(back["adapter"]["a"], state["adapter"]["a"])  # type: ignore[index]


def test_a_file_cut_short_or_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    StateImage(_state()).write(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="cut short"):
        read_state(path)
    path.write_bytes(b"stale")
    with pytest.raises(ValueError, match="not a checkpoint"):
        read_state(path)


def test_an_image_is_the_state_when_it_was_made_and_its_buffer_serves_the_next(
    tmp_path: Path,
) -> None:
    state = _state()
    first = StateImage(state)
    frozen = read_back(first, tmp_path / "first.bin")
    state["adapter"]["a"].add_(1)  # type: ignore[index]  # the optimizer goes on after the copy
    first.write(tmp_path / "again.bin")
    assert _same(read_state(tmp_path / "again.bin"), frozen)
    second = StateImage(state, reuse=first)
    assert _same(read_back(second, tmp_path / "second.bin"), state)
    assert not _same(frozen, state)


def read_back(image: StateImage, path: Path) -> object:
    image.write(path)
    assert path.stat().st_size == image.size  # no padding left at the end
    return read_state(path)


def test_a_checkpoint_of_the_previous_layout_still_reads(tmp_path: Path) -> None:
    """TUNCKPT1 (a job in flight across an upgrade): the tensors back to back after the header."""
    a, step = torch.arange(6, dtype=torch.float32).view(2, 3), torch.tensor(4.0)
    skeleton = {"adapter": {"a": _Ref(0)}, "step": _Ref(1), "n": 3}
    header = pickle.dumps((skeleton, [("float32", (2, 3), 24), ("float32", (), 4)]))
    path = tmp_path / "state.bin"
    raw = a.numpy().tobytes() + step.numpy().tobytes()
    path.write_bytes(b"TUNCKPT1" + struct.pack("<Q", len(header)) + header + raw)
    assert _same(read_state(path), {"adapter": {"a": a}, "step": step, "n": 3})
