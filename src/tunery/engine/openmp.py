"""Keep one OpenMP thread team busy at a time: a thread that hands its torch work to another
(the batched decode thread) releases its own idle OpenMP workers first.

libgomp (torch's OpenMP runtime on Linux) spin-waits briefly between parallel regions, which
makes the many small parallel ops of a decode step cheap. But once more OpenMP threads exist in
the process than there are cores, it shortens that spin to ~100 iterations for every team, so
each op pays a futex wake-up instead. A thread that once ran a parallel op (loading a model, a
reference-path request) keeps its team for life: on this 2-core machine that alone made the
decode thread's steps 1.5x slower (SDPA 24 → 85 µs per call, a packed matmul 1.1 → 1.9 ms).
`omp_pause_resource_all` frees the calling thread's team; its next parallel op builds a new one.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from functools import cache

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep the settings


@cache
def _pause_all() -> Callable[[int], int] | None:
    """libgomp's (or libomp's) `omp_pause_resource_all`, found among the symbols torch loaded;
    None where the runtime has none (no OpenMP, an old runtime)."""
    import torch  # noqa: F401  (loads the OpenMP runtime into the global namespace)

    try:
        process = ctypes.CDLL(None)  # the symbols the process has loaded (POSIX)
    except (OSError, TypeError):  # Windows takes no None here
        return None
    function = getattr(process, "omp_pause_resource_all", None)
    if function is None:
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


def release_workers() -> None:
    """Free the calling thread's idle OpenMP worker threads (a no-op where it has none)."""
    pause = _pause_all()
    if pause is not None:
        pause(_OMP_PAUSE_SOFT)
