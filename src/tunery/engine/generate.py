"""Generation on one shared base model: a KV-cached decode loop, sampling, stop sequences and
streaming, with each tuned model's LoRA adapter loaded once (LRU) for that base.

Two forwards run the loop: the transformers model with PEFT (`Backend.REFERENCE`, any base
model), and `fast_decode.FastGemma3`, a hand-written Gemma 3 step with a preallocated KV cache
(`Backend.FAST`: the same bf16 weights, the same tokens; `Backend.FAST_INT8`: int8 weights).
The fast forward reads an adapter's files itself and holds one bf16 copy of its A and B (about
half the file, which is fp32), no PEFT modules; a base model or adapter it does not support runs
on the reference forward, and only then does PEFT load that adapter into the model.
`Backend.LLAMA_CPP` decodes single-candidate requests with llama.cpp on the base model's GGUF and
the adapter as a GGUF LoRA (`llamacpp`), one request at a time; without llama-cpp-python, a GGUF
or a plain-LoRA adapter, and for several candidates, it decodes as `Backend.FAST` unbatched.

On `Backend.FAST`, single-candidate requests go to a `batching.BatchScheduler`: requests for any
adapters decode together, one batched step per token, with the same tokens as alone; on
`Backend.FAST_INT8` too where its int8 kernel is the native one (`FastGemma3.batchable`).
Everything else (the reference forward, torch's int8 kernel, several candidates) takes the model
lock and decodes one request at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Sequence
from collections.abc import Generator as Gen
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from tunery.engine import llamacpp
from tunery.engine.base_models import LoadedBase
from tunery.engine.batching import BatchScheduler
from tunery.engine.data import OUTPUT_PREFIX, encode_prompt
from tunery.engine.fast_decode import FastGemma3, FastLora, KVCache
from tunery.engine.gguf_blocks import GgufBlocks
from tunery.engine.hf_imports import HF_LOAD_LOCK, hf_name
from tunery.engine.llamacpp import LlamaCppModel, adapter_gguf
from tunery.engine.lora import ADAPTER_CONFIG
from tunery.engine.openmp import release_workers
from tunery.engine.sampling import pick, pick_top, rng_for
from tunery.engine.specs import (
    Candidate,
    FinishReason,
    Generation,
    GenerationParams,
    StreamChunk,
)
from tunery.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

MAX_LOADED_ADAPTERS = 64
# Gemma's chat turns end with this token; a model tuned or prompted in chat form stops there.
_END_OF_TURN = "<end_of_turn>"


class Backend(StrEnum):
    """Which forward decodes (see the module docstring)."""

    REFERENCE = "reference"
    FAST = "fast"
    FAST_INT8 = "fast-int8"
    LLAMA_CPP = "llama-cpp"


class Generator:
    """Decodes prompts with the base model or any tuned adapter on it: batched across requests on
    the fast bf16 forward, else one request at a time.

    The first adapter that runs on the reference forward wraps `base.model` in a PeftModel, which
    injects LoRA layers into it in place: this object then owns the model, so make one Generator
    per loaded base. Training must not use that model afterwards; it runs in the worker process,
    which never builds one.
    """

    def __init__(
        self,
        base: LoadedBase,
        max_adapters: int = MAX_LOADED_ADAPTERS,
        backend: Backend | str = Backend.FAST,
        decode_threads: Callable[[], int] | None = None,
        prompt_lookup: bool = True,
        native_kernels: bool = True,
    ) -> None:
        """`decode_threads`: asked before each batched decode step how many torch threads to use
        (the server lowers it while jobs train on the same cores); None leaves torch's.
        `prompt_lookup`: greedy decodes on llama.cpp verify prompt-lookup drafts (`lookup`).
        `native_kernels`: the fast forward's decode steps use the C kernels (`native`)."""
        self._base = base
        self._backend = Backend(backend)
        self._decode_threads = decode_threads
        self._fast: FastGemma3 | None = None  # built at the first fast decode
        self._batcher: BatchScheduler | None = None  # started at the first batched request
        # Guards `_fast`, `_batcher` and `_loras`: request threads load adapters while the model
        # lock may be held by a long decode that needs none of them.
        self._fast_lock = threading.Lock()
        # Fast-path LRU: resolved adapter folder → (mtime, weights; None: runs on PEFT).
        self._loras: OrderedDict[Path, tuple[int, FastLora | None]] = OrderedDict()
        self._tokenizer = base.tokenizer
        self._peft: Any = None  # PeftModel, created with the first adapter
        self._adapters: OrderedDict[Path, tuple[int, str]] = OrderedDict()  # PEFT LRU: mtime, name
        self._max_adapters = max_adapters
        self._next_adapter = 0
        self._lock = threading.Lock()  # a Lock (not RLock): a stream may resume on another thread
        self._eos_ids = _eos_ids(base)
        self._llama: LlamaCppModel | None = None  # built at the first llama.cpp decode
        self._llama_unusable = False  # llama.cpp is not installed or cannot run this base
        self._prompt_lookup = prompt_lookup
        self._native = native_kernels

    # -- public --------------------------------------------------------------------------------
    def count_tokens(self, prompt: str, adapter_dir: Path | None = None) -> int:
        """Tokens the model sees for `prompt`: BOS and, with an adapter, the training template."""
        return len(self._encode(prompt, adapter_dir))

    def generate(
        self, prompt: str, params: GenerationParams, adapter_dir: Path | None = None
    ) -> Generation:
        ids = self._checked_ids(prompt, params, adapter_dir)
        texts = [
            _TextStream(self._tokenizer, params, adapter_dir is not None)
            for _ in range(params.candidate_count)
        ]
        route = self._batch_route(params, adapter_dir)
        if route is not None:
            for _ in self._batched(ids, params, route, texts[0]):
                pass
        else:
            with self._lock:
                for _ in self._decode(ids, params, adapter_dir, texts):
                    pass
        return Generation(
            candidates=tuple(
                Candidate(t.text, t.finish_reason or FinishReason.MAX_TOKENS, t.token_count)
                for t in texts
            ),
            prompt_token_count=len(ids),
        )

    def stream(
        self, prompt: str, params: GenerationParams, adapter_dir: Path | None = None
    ) -> Iterator[StreamChunk]:
        """Text as it is decoded. Close the iterator to stop early: that frees the request's batch
        row, or the model lock on the unbatched forwards."""
        ids, route = self._stream_start(prompt, params, adapter_dir)
        return self._stream(ids, params, adapter_dir, route)

    def stream_async(
        self, prompt: str, params: GenerationParams, adapter_dir: Path | None = None
    ) -> AsyncGenerator[StreamChunk, None] | Iterator[StreamChunk]:
        """`stream` for an asyncio caller (validated now: call it off the loop, it may load an
        adapter): on the batch scheduler, an async stream whose tokens come to the loop that
        iterates it, no thread waiting per request; otherwise the blocking `stream`."""
        ids, route = self._stream_start(prompt, params, adapter_dir)
        if route is None:
            return self._stream(ids, params, adapter_dir, None)
        return self._batched_async(ids, params, route, adapter_dir is not None)

    # -- internals -----------------------------------------------------------------------------
    def _stream_start(
        self, prompt: str, params: GenerationParams, adapter_dir: Path | None
    ) -> tuple[list[int], _Route | None]:
        """A stream's prompt ids and batch route. It validates (and loads the adapter) now, not
        at the first piece, so bad input or a damaged adapter fails before a response starts."""
        if params.candidate_count != 1:
            raise InvalidArgument("`candidateCount` must be 1 when streaming")
        ids = self._checked_ids(prompt, params, adapter_dir)
        return ids, self._batch_route(params, adapter_dir)

    def _stream(
        self,
        ids: list[int],
        params: GenerationParams,
        adapter_dir: Path | None,
        route: _Route | None,
    ) -> Iterator[StreamChunk]:
        text = _TextStream(self._tokenizer, params, adapter_dir is not None)
        deltas: Gen[str, None, None]
        if route is not None:
            deltas = self._batched(ids, params, route, text)
        else:
            deltas = self._locked(ids, params, adapter_dir, text)
        try:
            for delta in deltas:
                if (chunk := _chunk(delta, text, ids)) is not None:
                    yield chunk
        finally:
            deltas.close()  # now, not when collected: frees the row or the lock at once

    async def _batched_async(
        self, ids: list[int], params: GenerationParams, route: _Route, tuned: bool
    ) -> AsyncGenerator[StreamChunk, None]:
        """`_stream` on the batch scheduler, its tokens delivered to this loop."""
        text = _TextStream(self._tokenizer, params, tuned)
        handle = route.scheduler.submit(ids, route.lora, params, asyncio.get_running_loop())
        try:
            async for tokens in handle.batches():  # one chunk for the tokens that came at once
                delta = "".join(self._deltas(tokens, params, text))
                if (chunk := _chunk(delta, text, ids)) is not None:
                    yield chunk
                if text.finish_reason is not None:
                    return
        finally:
            handle.close()

    def _locked(
        self, ids: list[int], params: GenerationParams, adapter_dir: Path | None, text: _TextStream
    ) -> Gen[str, None, None]:
        """One candidate's text deltas from the unbatched loop, holding the model lock."""
        with self._lock:
            for (delta,) in self._decode(ids, params, adapter_dir, [text]):
                yield delta

    def _batch_route(self, params: GenerationParams, adapter_dir: Path | None) -> _Route | None:
        """The scheduler and adapter weights for this request, or None when it runs unbatched
        (see the module docstring). Loads the adapter."""
        batched = (Backend.FAST, Backend.FAST_INT8)
        if params.candidate_count != 1 or self._backend not in batched:
            return None
        fast = self._fast_model()
        if fast is None or not fast.batchable:
            return None
        lora = None if adapter_dir is None else self._fast_lora(adapter_dir, fast)
        if adapter_dir is not None and lora is None:
            return None  # PEFT runs this adapter
        with self._fast_lock:
            if self._batcher is None:
                self._batcher = BatchScheduler(fast, self._eos_ids, threads=self._decode_threads)
            return _Route(self._batcher, lora)

    def _batched(
        self, ids: list[int], params: GenerationParams, route: _Route, text: _TextStream
    ) -> Gen[str, None, None]:
        """One candidate's text deltas from the batch scheduler; stops its row when the text
        ends (a stop sequence) or the consumer closes this iterator."""
        release_workers()  # this thread now only waits: see `openmp`
        handle = route.scheduler.submit(ids, route.lora, params)
        try:
            yield from self._deltas(handle, params, text)
            if text.finish_reason is None:  # not reached: the scheduler ends rows as above
                yield text.finish(FinishReason.MAX_TOKENS)
        finally:
            handle.close()

    def _deltas(
        self, tokens: Iterable[int], params: GenerationParams, text: _TextStream
    ) -> Iterator[str]:
        """`text`'s deltas as `tokens` come, until it ends (EOS, a stop sequence, max tokens)."""
        for token in tokens:
            yield self._delta(token, params, text)
            if text.finish_reason is not None:
                return

    def _delta(self, token: int, params: GenerationParams, text: _TextStream) -> str:
        """Push `token` to `text`; the text now safe to hand out (all of it once it ends)."""
        delta = text.push(token, token in self._eos_ids)
        if text.finish_reason is None and text.token_count >= params.max_output_tokens:
            delta += text.finish(FinishReason.MAX_TOKENS)
        return delta

    def _encode(self, prompt: str, adapter_dir: Path | None) -> list[int]:
        if adapter_dir is not None:
            return encode_prompt(self._tokenizer, prompt)
        ids: list[int] = self._tokenizer(prompt)["input_ids"]
        return ids

    def _checked_ids(
        self, prompt: str, params: GenerationParams, adapter_dir: Path | None
    ) -> list[int]:
        ids = self._encode(prompt, adapter_dir)
        limit = self._base.info.input_token_limit
        if len(ids) > limit:
            raise InvalidArgument(f"the prompt has {len(ids):,} tokens; the limit is {limit:,}")
        limit = self._base.info.output_token_limit
        if params.max_output_tokens > limit:
            raise InvalidArgument(f"`maxOutputTokens` must be <= {limit:,}")
        return ids

    @torch.inference_mode()
    def _decode(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        adapter_dir: Path | None,
        texts: Sequence[_TextStream],
    ) -> Iterator[list[str]]:
        """Run the model, feeding each step's tokens to `texts`; yields each step's new text.

        Candidates share the prompt's KV cache and decode as one batch; a finished candidate's
        row is dropped from the batch so it costs nothing more.
        """
        try:
            device = self._base.device
            rng = rng_for(params, device)
            max_len = len(prompt_ids) + params.max_output_tokens
            with self._forward(adapter_dir, max_len, len(texts)) as run:
                if rng is None and isinstance(run, _LlamaCppForward):
                    yield from self._greedy(run.greedy(prompt_ids, params), params, texts[0])
                    return
                n = len(texts)
                hidden = run.start(prompt_ids, n)  # (n, C): the prompt's last position, n times
                rows = list(range(n))  # candidate index of each batch row still decoding
                for step in range(params.max_output_tokens):
                    next_ids = run.next_tokens(hidden, params, rng)  # (rows,)
                    deltas = [""] * n
                    for tok, i in zip(next_ids, rows, strict=True):
                        deltas[i] = texts[i].push(tok, tok in self._eos_ids)
                    if step + 1 == params.max_output_tokens:
                        for i in rows:
                            if texts[i].finish_reason is None:
                                deltas[i] += texts[i].finish(FinishReason.MAX_TOKENS)
                    keep = [r for r, i in enumerate(rows) if texts[i].finish_reason is None]
                    yield deltas
                    if not keep:
                        return
                    next_tensor = torch.tensor(next_ids, device=device)
                    if len(keep) < len(rows):
                        index = torch.tensor(keep, device=device)
                        run.select(index)
                        next_tensor = next_tensor[index]
                        rows = [rows[r] for r in keep]
                    hidden = run.step(next_tensor)  # (rows, C)
        finally:
            release_workers()  # this thread's OpenMP team would slow the batch thread's steps

    def _greedy(
        self, tokens: Gen[int, None, None], params: GenerationParams, text: _TextStream
    ) -> Iterator[list[str]]:
        """One candidate's text deltas from a forward that picks its own greedy tokens."""
        try:
            for delta in self._deltas(tokens, params, text):
                yield [delta]
        finally:
            tokens.close()

    @contextlib.contextmanager
    def _forward(self, adapter_dir: Path | None, max_len: int, n: int) -> Iterator[_Forward]:
        """The forward for this decode of `n` candidates: llama.cpp when chosen and able, else
        fast where the model and the adapter allow."""
        if self._backend is Backend.LLAMA_CPP and n == 1:
            llama = self._llama_forward(adapter_dir, max_len)
            if llama is not None:
                yield llama
                return
        fast = self._fast_model()
        if fast is not None:
            lora = None if adapter_dir is None else self._fast_lora(adapter_dir, fast)
            if adapter_dir is None or lora is not None:
                yield _FastForward(fast, lora, max_len)
                return
            log.info("adapter %s runs on the reference forward", adapter_dir)
        if adapter_dir is None:
            # The base model is the empty adapter slot: LoRA layers switched off for this call.
            off = self._peft.disable_adapter() if self._peft is not None else None
            with off if off is not None else contextlib.nullcontext():
                yield _ReferenceForward(self._base.model)
            return
        self._peft_set_adapter(adapter_dir)
        yield _ReferenceForward(self._base.model)

    def _fast_model(self) -> FastGemma3 | None:
        """The fast forward of this base, built once; None on the reference backend or for a
        model it does not support."""
        if self._backend is Backend.REFERENCE or not FastGemma3.supports(self._base.config):
            return None
        with self._fast_lock:
            if self._fast is None:
                int8 = self._backend is Backend.FAST_INT8
                self._fast = FastGemma3(
                    self._base.config,
                    self._base.weights,
                    "int8" if int8 else "bf16",
                    native=self._native,
                    cache=self._base.kernel_cache,
                    blocks=GgufBlocks(self._base.gguf).of,
                )
            return self._fast

    def _llama_forward(self, adapter_dir: Path | None, max_len: int) -> _LlamaCppForward | None:
        """llama.cpp with `adapter_dir` applied, or None where it cannot decode this request.
        Called under the model lock (llama.cpp runs one request at a time)."""
        fast = self._fast_model()
        llama = self._llama_model()
        if fast is None or llama is None or max_len > llama.context:
            return None
        lora_file = None
        if adapter_dir is not None:
            path = Path(adapter_dir).resolve()
            version = _adapter_mtime(path)
            try:
                lora_file = adapter_gguf(path, fast, llama.arch)
            except Exception as e:  # a truncated or corrupt file: this model's problem only
                log.exception("adapter %s cannot be converted for llama.cpp", path)
                raise _damaged(path, e) from e
            if lora_file is None:
                return None
            llama.use_adapter(lora_file, version)
        else:
            llama.use_adapter(None)
        threads = self._decode_threads() if self._decode_threads else torch.get_num_threads()
        llama.set_threads(threads)
        return _LlamaCppForward(llama, self._prompt_lookup)

    def _llama_model(self) -> LlamaCppModel | None:
        """This base in llama.cpp, built once; None (said once in the log) where it cannot be."""
        if self._llama is not None or self._llama_unusable:
            return self._llama
        reason = None
        if not llamacpp.installed():
            reason = "llama-cpp-python is not installed (pip install 'tunery[llamacpp]')"
        else:
            gguf = self._base.gguf()
            if gguf is None:
                reason = "the base model has no GGUF file"
            else:
                try:
                    self._llama = LlamaCppModel(gguf, max_adapters=self._max_adapters)
                except ValueError as e:
                    reason = str(e)
        if reason is not None:
            log.warning("llama.cpp backend unavailable for %s: %s", self._base.info.name, reason)
            self._llama_unusable = True
        return self._llama

    def _fast_lora(self, adapter_dir: Path, fast: FastGemma3) -> FastLora | None:
        """`adapter_dir`'s weights for the fast forward, read once (LRU of `max_adapters`);
        None when the adapter needs PEFT."""
        with self._fast_lock:
            return self._fast_lora_locked(adapter_dir, fast)

    def _fast_lora_locked(self, adapter_dir: Path, fast: FastGemma3) -> FastLora | None:
        path = Path(adapter_dir).resolve()
        mtime = _adapter_mtime(path)
        cached = self._loras.get(path)
        if cached is not None and cached[0] == mtime:
            self._loras.move_to_end(path)
            return cached[1]
        log.info("loading adapter %s", path)
        try:
            lora = FastLora.load(path, fast)
        except Exception as e:  # a truncated or corrupt file: this model's problem only
            log.exception("adapter %s cannot be loaded", path)
            raise _damaged(path, e) from e
        self._loras[path] = (mtime, lora)
        self._loras.move_to_end(path)
        while len(self._loras) > self._max_adapters:
            self._loras.popitem(last=False)
        return lora

    def _peft_set_adapter(self, adapter_dir: Path) -> None:
        """Make `adapter_dir` the active adapter, loading it once (LRU of `max_adapters`)."""
        path = Path(adapter_dir).resolve()
        mtime = _adapter_mtime(path)
        cached = self._adapters.get(path)
        if cached is not None and cached[0] == mtime:
            self._adapters.move_to_end(path)
            self._peft.set_adapter(cached[1])
            return
        name = f"tuned_{self._next_adapter}"
        self._next_adapter += 1
        log.info("loading adapter %s as %s", path, name)
        try:
            if self._peft is None:
                base = self._base.model
                with HF_LOAD_LOCK:
                    peft_model = hf_name("peft", "PeftModel")
                    self._peft = peft_model.from_pretrained(base, str(path), adapter_name=name)
            else:
                self._peft.load_adapter(str(path), adapter_name=name)
        except Exception as e:  # a truncated or corrupt file: this model's problem only
            log.exception("adapter %s cannot be loaded", path)
            raise _damaged(path, e) from e
        self._peft.eval()
        self._peft.set_adapter(name)
        if cached is not None:
            self._peft.delete_adapter(cached[1])
        self._adapters[path] = (mtime, name)
        self._adapters.move_to_end(path)
        while len(self._adapters) > self._max_adapters:
            _, (_, old) = self._adapters.popitem(last=False)
            self._peft.delete_adapter(old)


def _adapter_mtime(path: Path) -> int:
    """The adapter's version: a rewritten folder (same path, new weights) must not be served
    from a stale copy. FailedPrecondition when its files are gone."""
    config = path / ADAPTER_CONFIG
    if not config.exists():
        raise FailedPrecondition(
            f"the adapter files of {path.parent.name} are missing; tune the model again"
        )
    weights = path / "adapter_model.safetensors"
    return (weights if weights.exists() else config).stat().st_mtime_ns


def _damaged(path: Path, e: Exception) -> FailedPrecondition:
    return FailedPrecondition(
        f"the adapter files of {path.parent.name} are damaged and cannot be loaded "
        f"({type(e).__name__}); tune the model again"
    )


@dataclass(frozen=True)
class _Route:
    """Where a batched request goes: the base's scheduler, with its adapter's fast weights."""

    scheduler: BatchScheduler
    lora: FastLora | None


class _Forward:
    """One decode's model state: prefill, one-token steps, row selection, logits."""

    def start(self, prompt_ids: list[int], n: int) -> torch.Tensor:
        """Run the prompt; return its last position's hidden state for `n` rows, (n, C)."""
        raise NotImplementedError

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) next tokens → (B, C) hidden states."""
        raise NotImplementedError

    def select(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index`."""
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, C) hidden → (B, V) float32 logits, as the model's own forward computes them."""
        raise NotImplementedError

    def next_tokens(
        self, hidden: torch.Tensor, params: GenerationParams, rng: torch.Generator | None
    ) -> list[int]:
        """(B, C) hidden → each row's next token: greedy (`rng` None) or sampled."""
        return pick(self.logits(hidden), params, rng).tolist()


class _ReferenceForward(_Forward):
    """The transformers model (with PEFT's LoRA layers) and its DynamicCache."""

    def __init__(self, model: Any) -> None:
        dynamic_cache = hf_name("transformers", "DynamicCache")
        self._model = model
        self._body = model.model  # the decoder stack: hidden states without the vocab head
        self._cache = dynamic_cache(config=model.config)

    def start(self, prompt_ids: list[int], n: int) -> torch.Tensor:
        input_ids = torch.tensor([prompt_ids], device=self._model.device)  # (1, T)
        out = self._body(input_ids=input_ids, cache=self._cache, use_cache=True)
        hidden: torch.Tensor = out.last_hidden_state[:, -1]  # only the last position needs logits
        if n > 1:
            self._cache.batch_repeat_interleave(n)
            hidden = hidden.expand(n, -1)
        return hidden

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self._body(input_ids=tokens[:, None], cache=self._cache, use_cache=True)
        hidden: torch.Tensor = out.last_hidden_state[:, -1]
        return hidden

    def select(self, index: torch.Tensor) -> None:
        self._cache.batch_select_indices(index)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self._model.lm_head(hidden)
        cap = getattr(self._model.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()


class _FastForward(_Forward):
    """`FastGemma3` with a cache sized for this decode."""

    def __init__(self, fast: FastGemma3, lora: FastLora | None, max_len: int) -> None:
        self._fast = fast
        self._lora = lora
        self._cache: KVCache = fast.new_cache(max_len)

    def start(self, prompt_ids: list[int], n: int) -> torch.Tensor:
        hidden = self._fast.prefill(prompt_ids, self._cache, self._lora)
        if n > 1:
            self._cache.repeat(n)
            hidden = hidden.expand(n, -1)
        return hidden

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._fast.step(tokens, self._cache, self._lora)

    def select(self, index: torch.Tensor) -> None:
        self._cache.select(index)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._fast.logits(hidden)

    def next_tokens(
        self, hidden: torch.Tensor, params: GenerationParams, rng: torch.Generator | None
    ) -> list[int]:
        """Greedy rows by the packed head's scan where the model has one, sampled ones with top-k
        from their k largest logits (`FastGemma3.top_logits`): as the batch scheduler picks."""
        if rng is None and self._fast.packed_head is not None:
            return self._fast.best_tokens(hidden)
        if rng is not None and params.top_k > 0:
            values, index = self._fast.top_logits(hidden, params.top_k)
            return pick_top(values, index, params, rng).tolist()
        return super().next_tokens(hidden, params, rng)


class _LlamaCppForward(_Forward):
    """llama.cpp's context, one row: "hidden" states are already the logits."""

    def __init__(self, llama: LlamaCppModel, lookup: bool) -> None:
        self._llama = llama
        self._lookup = lookup

    def start(self, prompt_ids: list[int], n: int) -> torch.Tensor:
        if n != 1:
            raise ValueError("llama.cpp decodes one candidate")
        return self._llama.start(prompt_ids)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._llama.step(int(tokens[0]))

    def select(self, index: torch.Tensor) -> None:
        if index.numel() != 1:
            raise ValueError("llama.cpp decodes one candidate")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def greedy(self, prompt_ids: list[int], params: GenerationParams) -> Gen[int, None, None]:
        """Greedy tokens, several per forward where prompt lookup finds text to repeat."""
        return self._llama.greedy(prompt_ids, params.max_output_tokens, lookup=self._lookup)


def _chunk(delta: str, text: _TextStream, ids: list[int]) -> StreamChunk | None:
    """A stream's next piece: the last carries why it ended and the counts; None when there is
    nothing to send yet (text held back)."""
    if text.finish_reason is not None:
        return StreamChunk(
            delta,
            finish_reason=text.finish_reason,
            prompt_token_count=len(ids),
            output_token_count=text.token_count,
        )
    return StreamChunk(delta) if delta else None


class _TextStream:
    """One candidate's text: incremental UTF-8-safe detokenizing, stop sequences, hold-back."""

    def __init__(self, tokenizer: Any, params: GenerationParams, strip_prefix: bool) -> None:
        self._tokenizer = tokenizer
        self._stops = params.stop_sequences
        # A tuned model answers after the template with OUTPUT_PREFIX, as it was trained to.
        self._prefix = OUTPUT_PREFIX if strip_prefix else ""
        self._ids: list[int] = []
        self._read_from = 0  # ids before this are already in `_raw`; decode from here on
        self._raw = ""  # decoded text so far (before removing the prefix)
        self.text = ""  # the output text so far, including what is held back
        self._sent = 0  # characters of `text` already handed out
        self.token_count = 0
        self.finish_reason: FinishReason | None = None

    def push(self, token: int, is_eos: bool) -> str:
        """Take the next token; return the text that is now safe to hand out."""
        self.token_count += 1
        if is_eos:
            return self.finish(FinishReason.STOP)
        self._ids.append(token)
        # Decode the ids since the last complete character together: a character split over
        # several byte tokens decodes to U+FFFD until its last byte arrives.
        piece = self._tokenizer.decode(self._ids[self._read_from :], skip_special_tokens=True)
        if piece.endswith("\ufffd"):
            return ""
        self._read_from = len(self._ids)
        self._raw += piece
        self.text = self._raw.removeprefix(self._prefix) if self._raw else ""
        if self._prefix and len(self._raw) < len(self._prefix):
            return ""
        # Held-back text guarantees a match cannot start before `_sent`.
        hits = [i for s in self._stops if (i := self.text.find(s, self._sent)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self.finish(FinishReason.STOP)
        safe = len(self.text) - _held_back(self.text, self._stops)
        out = self.text[self._sent : safe]
        self._sent = max(self._sent, safe)
        return out

    def finish(self, reason: FinishReason) -> str:
        """End the candidate; return whatever was held back."""
        self.finish_reason = reason
        out = self.text[self._sent :]
        self._sent = len(self.text)
        return out


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop sequence."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def _eos_ids(base: LoadedBase) -> frozenset[int]:
    """Every id that ends a turn: tokenizer/config/generation-config EOS and Gemma's end of turn."""
    tokenizer = base.tokenizer
    ids = set(base.eos_token_ids)
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    end_of_turn = tokenizer.convert_tokens_to_ids(_END_OF_TURN)
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return frozenset(ids)
