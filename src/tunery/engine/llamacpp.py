"""llama.cpp as an optional decode forward (`generate.Backend.LLAMA_CPP`).

The base model runs from its GGUF file (for the embedded model, the Q4_K_M file it was
dequantized from, so the weights are the same values), and a tuned model's adapter is applied at
run time as a GGUF LoRA (`gguf_lora`), written once next to its PEFT files. llama.cpp decodes one
request at a time here: each step returns the logits, and Tunery's own sampling, stop sequences
and streaming run on them, as on the other forwards.

`llama-cpp-python` is not a dependency: the `llamacpp` extra builds it from source (3-4 minutes
on 2 cores with the flags `run.sh` passes). Without it, or for a base model that has no GGUF,
the generator keeps its PyTorch forward.

llama.cpp's "extra buffer types" (weights repacked for AMX and interleaved kernels) are turned
off: on this project's Sapphire Rapids VMs its AMX matmul crashes in `llama_decode` (without AMX,
the repacked kernels measured no faster here). llama.cpp built with OpenMP shares libgomp with
torch, and libgomp cuts its spin-waits as soon as threads outnumber cores (any other thread that
ran a torch op keeps its own team): 29 instead of 50 tokens/s. `run.sh` builds it without.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunery.engine.fast_decode import FastGemma3, read_plain_lora
from tunery.engine.gguf_lora import SUPPORTED_ARCHITECTURES, write_gguf_lora
from tunery.engine.lookup import DraftPolicy, NgramDrafter

log = logging.getLogger(__name__)

ADAPTER_GGUF = "adapter_model.gguf"  # written next to adapter_model.safetensors
DEFAULT_CONTEXT = 4096  # tokens of prompt + output per request; longer ones take PyTorch
_BATCH = 512  # prompt tokens per llama_decode call
# Prompt-lookup draft sizes → a forward verifying them, in one-token forwards: its vocabulary head
# runs for every row (gemma-3-270m's Q8_0 head, 262k x 640, is most of a step), and above one row
# llama.cpp takes a slower kernel for it. Measured on 2 Zen 5 cores: 10.1 ms for one token, 31 /
# 39 / 52 ms for 3 / 7 / 15 drafts; rounded up here.
VERIFY_COSTS = {3: 3.2, 7: 4.0, 15: 5.4}
# A verified row whose two best logits are closer than this takes its token from a one-token
# forward: batched and one-token forwards differ by up to ~0.5 in a logit (measured, max 0.49).
NEAR_TIE = 0.5
_backend_once = threading.Lock()
_backend_ready = False


def installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCppModel:
    """A GGUF base model in llama.cpp with one context, and the adapters applied to it (each
    loaded once, LRU). Not thread-safe: the caller decodes one request at a time."""

    def __init__(
        self,
        gguf: Path,
        context: int = DEFAULT_CONTEXT,
        threads: int | None = None,
        max_adapters: int = 64,
    ) -> None:
        """`threads`: llama.cpp's decode threads (default: torch's count)."""
        import llama_cpp as lc

        threads = threads or torch.get_num_threads()

        global _backend_ready
        with _backend_once:
            if not _backend_ready:
                lc.llama_backend_init()
                _route_logs(lc)
                _backend_ready = True
                if b"OPENMP = 1" in lc.llama_print_system_info():
                    log.warning(
                        "llama.cpp was built with OpenMP, which it then shares with torch: "
                        "decoding can run at half speed; rebuild it as ./run.sh does "
                        "(CMAKE_ARGS=-DGGML_OPENMP=OFF)"
                    )
        self._lc = lc
        params = lc.llama_model_default_params()
        params.use_extra_bufts = False  # see the module docstring
        self._model = lc.llama_model_load_from_file(str(gguf).encode(), params)
        if not self._model:
            raise ValueError(f"llama.cpp could not load {gguf}")
        buf = ctypes.create_string_buffer(64)
        lc.llama_model_meta_val_str(self._model, b"general.architecture", buf, len(buf))
        self.arch = buf.value.decode()
        if self.arch not in SUPPORTED_ARCHITECTURES:
            lc.llama_model_free(self._model)
            raise ValueError(f"{gguf}: llama.cpp LoRA for {self.arch!r} models is not supported")
        ctx_params = lc.llama_context_default_params()
        ctx_params.n_ctx = context
        ctx_params.n_batch = _BATCH
        ctx_params.n_threads = ctx_params.n_threads_batch = threads
        self._ctx = lc.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            lc.llama_model_free(self._model)
            raise ValueError("llama.cpp could not make a context")
        self.context = int(lc.llama_n_ctx(self._ctx))
        self.n_vocab = int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self._model)))
        self._threads = threads
        self._adapters: OrderedDict[Path, tuple[int, Any]] = OrderedDict()  # mtime, handle
        self._max_adapters = max_adapters
        self._active: Any = None
        self._batch = lc.llama_batch_init(_BATCH, 0, 1)  # tokens at given positions, any outputs
        self.forwards = 0  # llama_decode calls so far
        self._closed = False
        _OPEN.add(self)

    def close(self) -> None:
        """Free the context, the adapters and the model (once; also done at exit)."""
        if self._closed:
            return
        self._closed = True
        lc = self._lc
        lc.llama_set_adapters_lora(self._ctx, None, 0, None)
        for _, handle in self._adapters.values():
            lc.llama_adapter_lora_free(handle)
        self._adapters.clear()
        lc.llama_batch_free(self._batch)
        lc.llama_free(self._ctx)
        lc.llama_model_free(self._model)

    def set_threads(self, threads: int) -> None:
        if threads != self._threads:
            self._lc.llama_set_n_threads(self._ctx, threads, threads)
            self._threads = threads

    def use_adapter(self, adapter_gguf: Path | None, version: int = 0) -> None:
        """Apply `adapter_gguf` (None: the base model alone) to the following decodes."""
        lc = self._lc
        handle = None
        if adapter_gguf is not None:
            cached = self._adapters.get(adapter_gguf)
            if cached is None or cached[0] != version:
                if cached is not None:
                    self._forget(adapter_gguf)
                handle = lc.llama_adapter_lora_init(self._model, str(adapter_gguf).encode())
                if not handle:
                    raise ValueError(f"llama.cpp could not load the adapter {adapter_gguf}")
                self._adapters[adapter_gguf] = (version, handle)
                while len(self._adapters) > self._max_adapters:
                    self._forget(next(iter(self._adapters)))
            else:
                handle = cached[1]
            self._adapters.move_to_end(adapter_gguf)
        if handle is self._active:
            return
        if handle is None:
            rc = lc.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            one = (lc.llama_adapter_lora_p_ctypes * 1)(handle)
            rc = lc.llama_set_adapters_lora(self._ctx, one, 1, (ctypes.c_float * 1)(1.0))
        if rc != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed ({rc})")
        self._active = handle

    def _forget(self, path: Path) -> None:
        _, handle = self._adapters.pop(path)
        if handle is self._active:
            self._lc.llama_set_adapters_lora(self._ctx, None, 0, None)
            self._active = None
        self._lc.llama_adapter_lora_free(handle)

    def start(self, ids: Sequence[int]) -> torch.Tensor:
        """A new sequence: run the prompt, return the last position's logits (1, V) fp32."""
        self._prefill(ids)
        return self._logits()

    def _prefill(self, ids: Sequence[int]) -> None:
        """Empty the cache and run the prompt (logits for its last position only)."""
        lc = self._lc
        lc.llama_memory_clear(lc.llama_get_memory(self._ctx), True)
        for lo in range(0, len(ids), _BATCH):
            self._decode(ids[lo : lo + _BATCH])

    def step(self, token: int) -> torch.Tensor:
        self._decode([token])
        return self._logits()

    def greedy(
        self, ids: Sequence[int], max_tokens: int, lookup: bool = True
    ) -> Generator[int, None, None]:
        """Greedy tokens after the prompt `ids`, up to `max_tokens` (close the iterator to stop).

        With `lookup`, each step also feeds a prompt-lookup draft (`lookup.NgramDrafter`) and
        keeps the longest prefix of it that the model itself predicts, several tokens per forward
        when the output repeats text it has seen. `DraftPolicy` sizes the drafts from
        `VERIFY_COSTS`, and only while the model has been agreeing with them. The tokens are those
        of one at a time but for rounding: llama.cpp's batched kernels round unlike its one-token
        ones, so a near tie in a verified row is decided by a one-token forward, and what is left
        is the cache entries of accepted drafts (batch-computed) nudging a later near tie.
        """
        drafter = NgramDrafter(ids)
        policy = DraftPolicy(VERIFY_COSTS)
        self._prefill(ids)
        pos = len(ids)  # tokens in the KV cache
        token = int(self._argmax(1)[0])
        produced = 0
        while True:
            yield token
            produced += 1
            if produced == max_tokens:
                return
            lookup_draft: list[int] = []
            if lookup:
                drafter.extend((token,))
                lookup_draft = drafter.draft(min(max(VERIFY_COSTS), max_tokens - produced - 1))
            draft = lookup_draft[: policy.size(len(lookup_draft))]
            inputs = [token, *draft]
            self._decode_at(inputs, pos, every=bool(draft))
            best = self._argmax(len(inputs))  # the model's next token after each input
            accepted = 0
            while accepted < len(draft) and best[accepted] == draft[accepted]:
                accepted += 1
            policy.observe(lookup_draft, [*draft[:accepted], int(best[accepted])])
            tie = self._first_near_tie(best, accepted) if draft else None
            if tie is not None:
                accepted = tie  # the rows before it stand; its own input is fed again alone
            kept = accepted + (tie is None)  # inputs that stay in the cache
            if kept < len(inputs):
                mem = self._lc.llama_get_memory(self._ctx)
                if not self._lc.llama_memory_seq_rm(mem, 0, pos + kept, -1):
                    raise RuntimeError("llama.cpp could not drop a rejected draft from its cache")
            if tie is not None:
                self._decode_at(inputs[tie : tie + 1], pos + tie, every=False)
                best[tie] = self._argmax(1)[0]
            pos += accepted + 1
            for token in draft[:accepted]:
                yield token
                produced += 1
                if produced == max_tokens:
                    return
                drafter.extend((token,))  # only drafts were accepted: lookup is on
            token = int(best[accepted])

    def _first_near_tie(self, best: np.ndarray, rows: int) -> int | None:
        """The first of the last decode's rows 0..`rows` whose best logit is within `NEAR_TIE`
        of another: there the batched forward's rounding may pick another token than a one-token
        forward would, so that row's token is taken from a one-token forward instead."""
        logits = self._outputs(rows + 1)
        for r in range(rows + 1):
            if np.count_nonzero(logits[r] >= logits[r, best[r]] - NEAR_TIE) > 1:
                return r
        return None

    def _decode_at(self, ids: Sequence[int], pos: int, every: bool) -> None:
        """Decode `ids` at positions pos, pos+1, ...: logits for every one, or for the last."""
        batch = self._batch
        batch.n_tokens = len(ids)
        last = len(ids) - 1
        for i, token in enumerate(ids):
            batch.token[i] = token
            batch.pos[i] = pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = every or i == last
        self.forwards += 1
        rc = self._lc.llama_decode(self._ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")

    def _argmax(self, rows: int) -> np.ndarray:
        """The largest logit's index in each of the last decode's `rows` outputs, read in place
        (the first of equal ones, as `sampling.greedy`)."""
        best: np.ndarray = self._outputs(rows).argmax(axis=1)
        return best

    def _outputs(self, rows: int) -> np.ndarray:
        """The last decode's logits, (rows, V) fp32, in batch order: a view of llama.cpp's
        buffer, valid until the next decode."""
        ptr = self._lc.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(rows, self.n_vocab))

    def _decode(self, ids: Sequence[int]) -> None:
        lc = self._lc
        tokens = (lc.llama_token * len(ids))(*ids)
        self.forwards += 1
        rc = lc.llama_decode(self._ctx, lc.llama_batch_get_one(tokens, len(ids)))
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")

    def _logits(self) -> torch.Tensor:
        ptr = self._lc.llama_get_logits_ith(self._ctx, -1)
        row = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return torch.from_numpy(row.copy()).unsqueeze(0)


_OPEN: weakref.WeakSet[LlamaCppModel] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Free every model before the interpreter exits: a context left to the C++ runtime's exit
    aborts the process ("terminate called without an active exception") as its threads stop."""
    for model in list(_OPEN):
        model.close()


_log_callback: Any = None  # kept alive: llama.cpp holds a pointer to it
_GGML_LOG_ERROR = 4  # enum ggml_log_level: none, debug, info, warn, error, cont


def _route_logs(lc: Any) -> None:
    """llama.cpp's log lines (a page of them per model load) to this module's logger: errors as
    warnings, the rest at debug level, never straight to stderr."""
    global _log_callback

    @lc.llama_log_callback  # type: ignore[untyped-decorator]
    def forward(level: int, text: bytes, _user: Any) -> None:
        line = text.decode("utf-8", errors="replace").rstrip()
        if line:
            log.log(
                logging.WARNING if level == _GGML_LOG_ERROR else logging.DEBUG,
                "llama.cpp: %s",
                line,
            )

    _log_callback = forward
    lc.llama_log_set(forward, ctypes.c_void_p(0))


def adapter_gguf(adapter_dir: Path, fast: FastGemma3, arch: str) -> Path | None:
    """The GGUF LoRA of a PEFT adapter folder, written on first use (and again when the
    safetensors are newer); None when the adapter is not plain LoRA on the projections."""
    out = adapter_dir / ADAPTER_GGUF
    weights_file = adapter_dir / "adapter_model.safetensors"
    if out.exists() and out.stat().st_mtime_ns >= weights_file.stat().st_mtime_ns:
        return out
    weights = read_plain_lora(adapter_dir, fast)  # one rank: every A is checked against `r`
    if weights is None:
        return None
    log.info("writing the llama.cpp adapter %s", out)
    write_gguf_lora(weights, arch, out)
    return out
