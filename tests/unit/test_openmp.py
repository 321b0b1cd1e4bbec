"""`openmp.release_workers` frees the calling thread's OpenMP worker threads, and torch runs
correctly (and builds a new team) afterwards."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from tunery.engine.openmp import _pause_all, release_workers


def _os_threads() -> int:
    return len(os.listdir(Path("/proc/self/task")))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs an OpenMP team of 2 or more")
@pytest.mark.skipif(_pause_all() is None, reason="the OpenMP runtime has no pause")
def test_release_frees_the_threads_team_and_torch_still_works() -> None:
    seen: dict[str, int | bool] = {}
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    expected = a @ b

    def work() -> None:
        # In a fresh thread: its first parallel op creates its own team of workers.
        before = _os_threads()
        (torch.ones(4_000_000) * 2).sum()
        seen["with_team"] = _os_threads() - before
        release_workers()
        seen["released"] = _os_threads() - before
        seen["correct_after"] = bool(torch.allclose(a @ b, expected))
        release_workers()  # a second call (no team now) is harmless
        seen["correct_again"] = bool(torch.allclose(a @ b, expected))

    threads = torch.get_num_threads()  # other tests may have lowered it (process-wide)
    torch.set_num_threads(2)
    try:
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    finally:
        torch.set_num_threads(threads)
    assert seen["with_team"] >= 1, seen  # the team's workers are OS threads
    assert seen["released"] == 0, seen
    assert seen["correct_after"] and seen["correct_again"]
