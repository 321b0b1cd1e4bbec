"""Continuous batching on one base model: a background thread decodes every running request
(each with its own tuned adapter, or none) in one batched step per token, admitting new requests
between steps and retiring finished ones, so 32 streams over 8 tuned models share each read of
the base weights instead of queueing for the model one at a time.

New prompts are prefilled together (`FastGemma3.prefill_many`, up to a prompt-token budget per
step), so a burst of arrivals reads the weights once, not once per prompt. Rows and prompts get
the bits they get alone (see `batch_decode`), so a request's tokens do not depend on what else is
running. Callers get token ids from a `Handle` and do the text work (detokenizing, stop
sequences) themselves: on their own thread, or on an asyncio loop the handle was made for (the
API's streams: each step's tokens reach the loop in one wake-up, with no thread per request);
closing the handle frees the row at the next step.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from dataclasses import dataclass, field

import torch

from tunery.engine.batch_decode import MAX_ROWS, Lora32, Span, pad_rows, step_rows
from tunery.engine.fast_decode import FastGemma3, FastLora, KVCache
from tunery.engine.openmp import release_workers
from tunery.engine.sampling import pick, pick_top, rng_for
from tunery.engine.specs import GenerationParams

log = logging.getLogger(__name__)

# Prompt tokens prefilled per step, together (the first waiting prompt goes in however long): a
# burst of arrivals delays the running rows' next token by about one forward over this many
# (~0.3 ms a token of short prompts by the whole-step kernel, 32 prompts of ~11 tokens in 115 ms;
# it was 256 at twice that cost a token).
PROMPT_TOKENS_PER_STEP = 512
# With this many rows or more, a row's tokens are handed out every STREAM_EVERY steps (its first
# token and its last at once), so a stream sends a chunk of STREAM_EVERY tokens, not one a step.
# Each chunk costs the asyncio loop ~75 us (its JSON, Starlette's and uvicorn's send chain,
# detokenizing), taken from one of the decode step's OpenMP threads on a 2-core CPU; a token
# then reaches its client at most STREAM_EVERY - 1 steps later, and the request ends no later.
STREAM_ROWS = 16
STREAM_EVERY = 2
IDLE_EXIT_S = 60.0  # the decode thread ends after this long with nothing to do; submit restarts it

_END = object()  # queue marker: no more tokens


class Handle:
    """One submitted request: iterate for its token ids (the EOS token included, as the last),
    or with `loop` (an asyncio loop) `async for` them on that loop, no thread waiting per
    request; `close()` when no more are wanted (a stop sequence, a client gone) to free its
    batch row."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._loop = loop
        self._arrived: asyncio.Queue[object] | None = None if loop is None else asyncio.Queue()
        self.closed = False

    def __iter__(self) -> Iterator[int]:
        while (token := _token(self._queue.get())) is not None:
            yield token

    async def __aiter__(self) -> AsyncIterator[int]:
        async for tokens in self.batches():
            for token in tokens:
                yield token

    async def batches(self) -> AsyncIterator[list[int]]:
        """On the handle's loop: the token ids that have arrived since the last batch (at least
        one), as one list each, until the end."""
        if self._arrived is None:
            raise RuntimeError("a handle made without a loop is iterated with `for`")
        arrived = self._arrived
        while True:
            tokens: list[int] = []
            item = await arrived.get()
            while True:
                token = _token(item)
                if token is None:
                    if tokens:
                        yield tokens
                    return
                tokens.append(token)
                if arrived.empty():
                    break
                item = arrived.get_nowait()
            yield tokens

    def close(self) -> None:
        self.closed = True

    def _put(self, item: object) -> None:
        _deliver([(self, item)])


def _deliver(puts: list[tuple[Handle, object]]) -> None:
    """Hand each item to its handle: a step's items for the handles of one asyncio loop in one
    wake-up of that loop (not a `call_soon_threadsafe` each: 32 wake-ups a step), the others on
    their queues."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Handle, object]]] = {}
    for handle, item in puts:
        if handle._loop is None or handle._arrived is None:
            handle._queue.put(item)
        else:
            by_loop.setdefault(handle._loop, []).append((handle, item))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_arrive, items)
        except RuntimeError:  # the loop has closed: nobody is listening
            for handle, _ in items:
                handle.closed = True


def _arrive(items: list[tuple[Handle, object]]) -> None:
    """On a handle's loop: each item onto its handle's queue."""
    for handle, item in items:
        assert handle._arrived is not None
        handle._arrived.put_nowait(item)


def _token(item: object) -> int | None:
    """What a handle's queue held: a token id, None at the end; an error is raised."""
    if item is _END:
        return None
    if isinstance(item, BaseException):
        raise item
    assert isinstance(item, int)
    return item


@dataclass
class _Row:
    """A request's decode state on the scheduler thread."""

    prompt: list[int]
    lora: FastLora | None
    params: GenerationParams
    handle: Handle
    rng: torch.Generator | None
    cache: KVCache | None = None
    next_token: int = 0  # fed at the next step
    produced: int = 0
    held: list[object] = field(default_factory=list)  # tokens not yet handed out (STREAM_EVERY)
    key: int = field(default=-1)  # adapter identity: rows are ordered by it into spans

    def new_cache(self, fast: FastGemma3) -> KVCache:
        """An empty cache for its prompt and every token it may produce."""
        return fast.new_cache(len(self.prompt) + self.params.max_output_tokens)


class BatchScheduler:
    """Continuous batching over one `FastGemma3` (bf16 weights: see `batch_decode`)."""

    def __init__(
        self,
        fast: FastGemma3,
        eos_ids: Collection[int],
        max_rows: int = MAX_ROWS,
        prompt_tokens: int = PROMPT_TOKENS_PER_STEP,
        threads: Callable[[], int] | None = None,
    ) -> None:
        """`threads`: asked before each step how many torch threads to decode with."""
        if not 0 < max_rows <= MAX_ROWS:
            raise ValueError(f"max_rows must be in 1..{MAX_ROWS}")
        self._fast = fast
        self._eos = frozenset(eos_ids)
        self._max_rows = max_rows
        self._prompt_tokens = prompt_tokens
        self._waiting: deque[_Row] = deque()
        self._rows: list[_Row] = []  # decoding; touched by the decode thread only
        # The last step's tokens, handed out just before the next native call (see `_flush`)
        self._outbox: list[tuple[Handle, object]] = []
        self._lora32: dict[int, tuple[FastLora, Lora32]] = {}  # id(lora) → fp32 copy in use
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = 0  # rows admitted and not yet retired, as of the last step (locked)
        self._closed = False
        self._threads = threads
        self.peak_rows = 0  # most rows decoded in one step so far (for tests and benches)
        _SCHEDULERS.add(self)

    def close(self, timeout_s: float = 10.0) -> None:
        """End the decode thread (requests still waiting or decoding get an error); for process
        exit, where a thread left inside torch can abort the interpreter's teardown."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    def pending(self) -> int:
        """Requests waiting or decoding; a closed one counts until its row is freed."""
        with self._cond:
            return len(self._waiting) + self._running

    def submit(
        self,
        prompt_ids: list[int],
        lora: FastLora | None,
        params: GenerationParams,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Handle:
        """Queue a request (its prompt already validated); its tokens arrive on the handle (on
        `loop`, for `async for`, when given)."""
        if self._closed:
            raise RuntimeError("the decode scheduler is closed")
        handle = Handle(loop)
        row = _Row(list(prompt_ids), lora, params, handle, rng_for(params, self._fast.device))
        row.key = -1 if lora is None else id(lora)
        with self._cond:
            self._waiting.append(row)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="tunery-batch-decode", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return handle

    # -- the decode thread ---------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    if not self._waiting and not self._rows and not self._closed:
                        release_workers()  # idle: leave the cores to other threads' teams
                        self._cond.wait_for(
                            lambda: bool(self._waiting) or self._closed, timeout=IDLE_EXIT_S
                        )
                    if self._closed:
                        self._flush()
                        for row in [*self._waiting, *self._rows]:
                            row.handle._put(RuntimeError("the server is shutting down"))
                        self._waiting.clear()
                        self._rows = []
                    if not self._waiting and not self._rows:
                        self._thread = None  # under the lock: submit starts a new one
                        self._lora32.clear()
                        return
                    new = self._admit()
                    self._running = len(self._rows) + len(new)
                if self._threads is not None:
                    wanted = self._threads()
                    if wanted != torch.get_num_threads():
                        torch.set_num_threads(wanted)
                try:
                    self._iteration(new)
                except Exception as e:  # a bug, or out of memory: fail these requests, go on
                    log.exception("batched decode step failed")
                    self._flush()
                    for row in self._rows + new:
                        row.handle._put(e)
                    self._rows = []
                    self._lora32.clear()
                if not self._rows:  # no step next: nothing to hand them out before
                    self._flush()
                with self._cond:
                    self._running = len(self._rows)

    def _admit(self) -> list[_Row]:
        """Waiting requests for this step (locked): while there is a free row, up to
        `prompt_tokens` prompt tokens in all, and always the first if a row is free."""
        room = self._max_rows - len(self._rows)
        new: list[_Row] = []
        budget = self._prompt_tokens
        while self._waiting and len(new) < room:
            cost = len(self._waiting[0].prompt)
            if new and cost > budget:
                break
            budget -= cost
            new.append(self._waiting.popleft())
        return new

    def _iteration(self, new: list[_Row]) -> None:
        """One step for the running rows and the prompts of `new` (all prefilled together),
        then one token for each."""
        fast = self._fast
        rows = sorted((r for r in self._rows if not r.handle.closed), key=lambda r: r.key)
        hidden: list[torch.Tensor] = []
        if rows:
            tokens = torch.tensor([r.next_token for r in rows], device=fast.device)
            caches = [r.cache for r in rows if r.cache is not None]
            spans = self._spans(rows)
            self._flush()
            hidden.append(step_rows(fast, tokens, caches, spans))
        new = [row for row in new if not row.handle.closed]
        try:
            if new:
                self._flush()
                caches = [r.new_cache(fast) for r in new]
                prompts, loras = [r.prompt for r in new], [r.lora for r in new]
                hidden.append(fast.prefill_many(prompts, caches, loras))
                for row, cache in zip(new, caches, strict=True):
                    row.cache = cache
            rows += new
        except Exception:  # out of memory, say: each alone, to fail only the one at fault
            log.exception("prefill of %d prompts failed; trying each alone", len(new))
            for row in new:
                try:
                    row.cache = row.new_cache(fast)
                    hidden.append(fast.prefill(row.prompt, row.cache, row.lora))
                except Exception as e:  # this request's problem only
                    log.exception("prefill failed")
                    row.handle._put(e)
                    continue
                rows.append(row)
        if not rows:
            self._rows = []
            return
        self.peak_rows = max(self.peak_rows, len(rows))
        states = torch.cat(hidden)
        best = [0] * len(rows)
        greedy_rows = [j for j, row in enumerate(rows) if row.rng is None]
        sampled = [j for j, row in enumerate(rows) if row.rng is not None]
        if greedy_rows:  # each row's token alone: see `FastGemma3.best_tokens`
            picked = fast.best_tokens(states if not sampled else states[greedy_rows])
            for j, token in zip(greedy_rows, picked, strict=True):
                best[j] = token
        # Sampled rows with top-k: their k largest logits (the most any asks for; a row's
        # first k are its own k largest); the others their full logits, (B, V) in bf16 (exact
        # in fp32; a lone row padded). Each row's generator draws as in the solo loop.
        top = [
            (j, rows[j].params, rng)
            for j in sampled
            if rows[j].params.top_k > 0 and (rng := rows[j].rng) is not None
        ]
        if top:
            values, index = fast.top_logits(
                states[[j for j, _, _ in top]], max(p.top_k for _, p, _ in top)
            )
            for i, (j, params, rng) in enumerate(top):
                n = params.top_k
                best[j] = int(pick_top(values[i : i + 1, :n], index[i : i + 1, :n], params, rng))
        full = [j for j in sampled if rows[j].params.top_k <= 0]
        if full:
            logits = fast.logits(pad_rows(states[full]), float32=False)
            for i, j in enumerate(full):
                best[j] = int(pick(logits[i : i + 1].float(), rows[j].params, rows[j].rng))
        keep = []
        puts: list[tuple[Handle, object]] = []
        every = STREAM_EVERY if len(rows) >= STREAM_ROWS else 1
        for j, row in enumerate(rows):
            token = best[j]
            row.produced += 1
            row.held.append(token)
            ended = token in self._eos or row.produced >= row.params.max_output_tokens
            if ended:
                row.held.append(_END)
            else:
                row.next_token = token
                keep.append(row)
            if ended or (row.produced - 1) % every == 0:  # the first, then every `every`
                puts += [(row.handle, item) for item in row.held]
                row.held = []
        self._outbox = puts
        self._rows = keep
        live = {r.key for r in keep}
        for key in [k for k in self._lora32 if k not in live]:
            del self._lora32[key]

    def _flush(self) -> None:
        """Hand out the last step's tokens. Called just before the next step's native call,
        which releases the GIL for its whole length: the asyncio loop then streams them out
        meanwhile. Handed out as the step ended, the loop took the GIL from the decode thread's
        bookkeeping for ~2 ms a 32-row step."""
        if self._outbox:
            _deliver(self._outbox)
            self._outbox = []

    def _spans(self, rows: list[_Row]) -> list[Span]:
        """Runs of rows (sorted by adapter) sharing one adapter, with its fp32 weights."""
        spans: list[Span] = []
        start = 0
        for j in range(1, len(rows) + 1):
            if j == len(rows) or rows[j].key != rows[start].key:
                lora = rows[start].lora
                spans.append((start, j, None if lora is None else self._weights(lora)))
                start = j
        return spans

    def _weights(self, lora: FastLora) -> Lora32:
        cached = self._lora32.get(id(lora))
        if cached is None or cached[0] is not lora:
            cached = (lora, Lora32(lora, self._fast))
            self._lora32[id(lora)] = cached
        return cached[1]


_SCHEDULERS: weakref.WeakSet[BatchScheduler] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Stop every decode thread before the interpreter tears down: a one-shot process (the CLI's
    `generate`) was seen to abort at exit ("terminate called without an active exception") with
    the idle decode thread still alive."""
    for scheduler in list(_SCHEDULERS):
        scheduler.close()
