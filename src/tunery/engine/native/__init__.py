"""Native decode attention: `decode_attention.c` compiled once per machine with the system C
compiler (~0.3 s) and called through ctypes, for every row of a decode step in one call.

Torch's attention runs one op per row and layer when rows have their own caches (~40 µs each
with the slicing around it: 23 ms of a 32-row step on 2 cores); padding the rows into one
`scaled_dot_product_attention` would change a row's bits with its neighbours' lengths. The C
kernel does each row alone, in an order fixed by that row's cache, in one call per layer.

Where no compiler works (or on a GPU, or weights that are not bf16) `NativeAttention.load()` is
None and callers keep torch's per-row attention.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("decode_attention.c")
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]


class NativeAttention:
    """The compiled kernel for bf16 CPU tensors."""

    def __init__(self, library: ctypes.CDLL) -> None:
        fn = library.tunery_decode_attention
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [i64, i64, i64, i64, ptr, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr]
        fn.argtypes += [ctypes.c_float, ptr, ctypes.c_int]
        fn.restype = ctypes.c_int
        self._fn = fn

    @staticmethod
    def load() -> NativeAttention | None:
        """The kernel, compiled on first use; None where it cannot be built or loaded."""
        library = _library()
        return None if library is None else NativeAttention(library)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_caches: Sequence[torch.Tensor],
        v_caches: Sequence[torch.Tensor],
        positions: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Write each row's new key and value at its position's slot, then attend.

        q (B, nh, hd) contiguous; k, v (B, nkv·hd) with any row stride; `k_caches[r]` and
        `v_caches[r]` (nkv, size_r, hd) contiguous, a ring when `positions[r]` ≥ size_r;
        `positions` (B,) int64. Returns (B, nh·hd) in bf16."""
        rows, nh, hd = q.shape
        nkv = k_caches[0].shape[0]
        for t in (k, v):
            if t.stride(-1) != 1:
                raise ValueError("k and v rows must be contiguous")
        sizes = torch.tensor([c.shape[1] for c in k_caches], dtype=torch.int64)
        kp = (ctypes.c_void_p * rows)(*[c.data_ptr() for c in k_caches])
        vp = (ctypes.c_void_p * rows)(*[c.data_ptr() for c in v_caches])
        out = torch.empty(rows, nh * hd, dtype=q.dtype)
        status = self._fn(
            rows, nh, nkv, hd, q.data_ptr(), k.data_ptr(), k.stride(0), v.data_ptr(),
            v.stride(0), kp, vp, positions.data_ptr(), sizes.data_ptr(), scale,
            out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("decode attention: out of memory")
        return out


@cache
def _library() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler: decode attention runs row by row in torch")
        return None
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + repr((compiler, _FLAGS, _cpu())).encode()).hexdigest()[:16]
    target = _cache_dir() / f"decode_attention-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            for openmp in (["-fopenmp"], []):  # a compiler without OpenMP builds it serial
                cmd = [compiler, *_FLAGS, *openmp, "-o", str(built), str(_SOURCE), "-lm"]
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode == 0:
                    break
            else:
                log.warning("could not compile %s: %s", _SOURCE.name, done.stderr.strip()[-500:])
                return None
            os.replace(built, target)  # atomic: concurrent processes see one whole file
    import torch  # noqa: F401  (its libgomp is loaded first, so the kernel shares its threads)

    try:
        return ctypes.CDLL(str(target))
    except OSError as e:
        log.warning("could not load %s: %s", target, e)
        return None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "tunery" / "native"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"tunery-native-{os.getuid()}"


def _cpu() -> str:
    """What `-march=native` compiles for: a build is reused only on the same kind of CPU."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    model = next((line for line in info.splitlines() if line.startswith("model name")), "")
    return model + flags
