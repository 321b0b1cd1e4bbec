"""Continuous batching on a tiny random Gemma 3 (sliding window 64): rows for different adapters
decoded in one batch get the bits they get alone, concurrent requests the tokens of the
single-stream loop, and a closed request frees its row."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.unit.test_generate import _load
from tunery.engine.base_models import LoadedBase
from tunery.engine.batch_decode import MAX_ROWS, Lora32, step_rows
from tunery.engine.batching import STREAM_EVERY, STREAM_ROWS, BatchScheduler, Handle
from tunery.engine.fast_decode import FastGemma3, FastLora, Linear, Weights
from tunery.engine.generate import Backend, Generator, _TextStream
from tunery.engine.native import NativeKernels
from tunery.engine.specs import GenerationParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    " ".join(f"word{i}" for i in range(60)),  # > 64 tokens: the sliding window's ring wraps
    "Once upon a time",
    "1, 2, 3,",
    "Hello",
]


def _adapter(base: LoadedBase, path: Path, seed: int, targets: list[str]) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4 + seed, lora_alpha=32, target_modules=targets)
    config.init_lora_weights = False  # random B too, so each adapter changes the output
    get_peft_model(_load(base.model_dir).model, config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(tiny_model_path: Path) -> LoadedBase:
    return _load(tiny_model_path)


@pytest.fixture(scope="module")
def adapters(base: LoadedBase, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("adapters")
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return [
        _adapter(base, tmp / "all", 1, every),
        _adapter(base, tmp / "some", 2, ["q_proj", "v_proj", "down_proj"]),
        _adapter(base, tmp / "mlp", 3, ["gate_proj", "down_proj"]),
    ]


@torch.inference_mode()
def _solo(fast: FastGemma3, ids: list[int], lora: FastLora | None, n: int) -> list[int]:
    """The single-stream fast loop: prefill, then one `FastGemma3.step` per token, greedy by
    the scheduler's rule (`FastGemma3.best_tokens`)."""
    cache = fast.new_cache(len(ids) + n)
    hidden = fast.prefill(ids, cache, lora)
    out: list[int] = []
    for _ in range(n):
        (token,) = fast.best_tokens(hidden)
        out.append(token)
        hidden = fast.step(torch.tensor([token]), cache, lora)
    return out


@pytest.mark.parametrize(
    ("native", "weights", "fp32"),
    [(True, "bf16", False), (False, "bf16", False), (True, "bf16", True), (True, "int8", True)],
    ids=["native kernels", "torch", "native panels", "native int8"],
)
def test_batched_rows_are_bit_identical_to_rows_stepped_alone(
    base: LoadedBase, adapters: list[Path], native: bool, weights: Weights, fp32: bool
) -> None:
    tensors = base.weights
    if fp32:  # as a CPU without AVX512-BF16 runs the model: on the native kernels' panels
        tensors = {name: t.float() for name, t in tensors.items()}
    fast = FastGemma3(base.config, tensors, weights, native=native)
    assert (fast.native is not None) == (native and NativeKernels.load() is not None)
    if fp32 and fast.native is None:
        pytest.skip("no C compiler on this machine")
    assert fast.batchable
    # a lone row steps unpadded exactly where every projection is on the panels, or on AMX tiles
    tiles = fast.native is not None and fast.native.tiles and not fp32
    assert fast.lone_row_exact == (fp32 or tiles)
    assert MAX_ROWS <= Linear.NATIVE_INT8_MAX_ROWS  # every step of a row: the same kernel
    loras = [FastLora.load(a, fast) for a in adapters]
    assert all(lora is not None for lora in loras)
    # Rows ordered by adapter: none, none, all, all, some, mlp.
    rows = [None, None, loras[0], loras[0], loras[1], loras[2]]
    weights = {id(lora): Lora32(lora, fast) for lora in loras if lora is not None}
    spans = [(0, 2, None), (2, 4, weights[id(loras[0])]), (4, 5, weights[id(loras[1])])]
    spans.append((5, 6, weights[id(loras[2])]))
    with torch.inference_mode():
        ids = [base.tokenizer(p)["input_ids"] for p in PROMPTS]
        ids[4] = ids[0]  # rows 0 and 4 (other adapters) have equal lengths throughout
        solo = [fast.new_cache(len(i) + 80) for i in ids]
        batch = [fast.new_cache(len(i) + 80) for i in ids]
        for i, lora, a, b in zip(ids, rows, solo, batch, strict=True):
            fast.prefill(i, a, lora)
            fast.prefill(i, b, lora)
        for step in range(70):  # past the 64-token window for every row
            tokens = torch.tensor([(7 * step + 3 * r) % 1000 + 10 for r in range(len(rows))])
            batched = step_rows(fast, tokens, batch, spans)
            for r, lora in enumerate(rows):
                one = [(0, 1, None if lora is None else weights[id(lora)])]
                alone = step_rows(fast, tokens[r : r + 1], [solo[r]], one)
                assert torch.equal(batched[r : r + 1], alone), (step, r)


def test_a_decode_step_in_one_native_call_gives_the_op_by_op_bits(
    base: LoadedBase, adapters: list[Path]
) -> None:
    """The whole-step kernel (`FastGemma3.step_model`: every layer in one C call) gives each row
    the bits of the step op by op, batched over adapters and a row with none, and on the
    single-stream path (`FastGemma3.step`), past the sliding window's wrap. (Both from the same
    caches: the op-by-op model's prefill, as the whole-step one prefills by its kernel.)"""
    whole = FastGemma3(base.config, base.weights)
    if whole.step_model is None:
        pytest.skip("no whole-step kernel here (it needs AMX tiles)")
    by_op = FastGemma3(base.config, base.weights, whole_step=False)
    assert by_op.step_model is None
    runs = []
    by_op_loras = [FastLora.load(a, by_op) for a in adapters]
    for fast in (whole, by_op):
        loras = [FastLora.load(a, fast) for a in adapters]
        assert all(lora is not None for lora in loras)
        w32 = [Lora32(lora, fast) for lora in loras if lora is not None]
        spans = [(0, 1, None), (1, 3, w32[0]), (3, 4, w32[1]), (4, 6, w32[2])]
        ids = [base.tokenizer(p)["input_ids"] for p in PROMPTS]
        out = []
        with torch.inference_mode():
            caches = [fast.new_cache(len(i) + 80) for i in ids]
            single = fast.new_cache(len(ids[2]) + 80)
            first, second, third = by_op_loras
            prefill_rows = [None, first, first, second, third, third]  # as the spans
            for i, cache, lora in zip(ids, caches, prefill_rows, strict=True):
                by_op.prefill(i, cache, lora)
            by_op.prefill(ids[2], single, by_op_loras[0])
            for step in range(70):
                tokens = torch.tensor([(5 * step + 11 * r) % 1000 + 10 for r in range(6)])
                out.append(step_rows(fast, tokens, caches, spans))
                out.append(fast.step(tokens[2:3], single, loras[0]))
        runs.append(out)
    for k, (a, b) in enumerate(zip(*runs, strict=True)):
        assert torch.equal(a, b), k


def test_prompts_prefilled_together_get_the_bits_they_get_alone(
    base: LoadedBase, adapters: list[Path]
) -> None:
    fast = FastGemma3(base.config, base.weights)
    loras = [None, *(FastLora.load(a, fast) for a in adapters)]
    prompts = [base.tokenizer(p)["input_ids"] for p in PROMPTS]
    prompts.append(prompts[0][:1])  # a one-token prompt: padded to two rows, alone or not
    with torch.inference_mode():
        jobs = [(ids, loras[k % len(loras)]) for k, ids in enumerate(prompts)]
        alone = []
        for ids, lora in jobs:
            cache = fast.new_cache(len(ids) + 8)
            alone.append((fast.prefill(ids, cache, lora), cache))
        caches = [fast.new_cache(len(ids) + 8) for ids, _ in jobs]
        together = fast.prefill_many([i for i, _ in jobs], caches, [lora for _, lora in jobs])
        for k, ((hidden, cache), other) in enumerate(zip(alone, caches, strict=True)):
            assert torch.equal(together[k : k + 1], hidden), k
            assert other.length == cache.length == len(jobs[k][0])
            n = min(cache.length, cache.sizes[0])  # the filled slots of layer 0's ring
            assert torch.equal(other.k[0][:, :, :n], cache.k[0][:, :, :n]), k
            assert torch.equal(other.v[-1][:, :, :n], cache.v[-1][:, :, :n]), k


def _concurrently(
    gen: Generator, jobs: list[tuple[str, Path | None, GenerationParams]]
) -> dict[int, str]:
    """Each job's text, all requested at once from threads; they must have shared steps."""
    results: dict[int, str] = {}

    def run(k: int) -> None:
        prompt, adapter, params = jobs[k]
        results[k] = gen.generate(prompt, params, adapter).candidates[0].text

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert gen._batcher is not None and gen._batcher.peak_rows > 4  # they did share steps
    return results


def test_concurrent_requests_over_adapters_get_their_solo_tokens(
    base: LoadedBase, adapters: list[Path]
) -> None:
    gen = Generator(base, backend=Backend.FAST)
    fast = FastGemma3(base.config, base.weights)
    jobs = [(p, [None, *adapters][k % 4]) for k, p in enumerate(PROMPTS * 2)]
    params = GenerationParams(max_output_tokens=40)
    results = _concurrently(gen, [(prompt, adapter, params) for prompt, adapter in jobs])
    for k, (prompt, adapter) in enumerate(jobs):  # one at a time: a batch of one
        assert gen.generate(prompt, params, adapter).candidates[0].text == results[k], k
    for k, (prompt, adapter) in enumerate(jobs):  # the single-stream loop, `FastGemma3.step`
        lora = None if adapter is None else FastLora.load(adapter, fast)
        text = _TextStream(base.tokenizer, params, adapter is not None)
        for token in _solo(fast, gen._encode(prompt, adapter), lora, 40):
            text.push(token, token in gen._eos_ids)
            if text.finish_reason is not None:
                break
        assert results[k] == text.text, k


def test_concurrent_sampled_requests_draw_their_solo_tokens(
    base: LoadedBase, adapters: list[Path]
) -> None:
    """Seeded sampling in a batch: rows with top-k draw from their k largest logits (other k's
    in the same step: the scheduler takes the largest and each row its first k), a row without
    top-k from its full logits, each with its own generator: the tokens the unbatched loop draws
    for the same request, and another seed other tokens."""
    gen = Generator(base, backend=Backend.FAST)
    kinds = [
        GenerationParams(max_output_tokens=24, temperature=1.0, top_k=40, top_p=0.95, seed=1),
        GenerationParams(max_output_tokens=24, temperature=0.7, top_k=5, seed=2),
        GenerationParams(max_output_tokens=24, temperature=1.0, top_p=0.9, seed=3),
        GenerationParams(max_output_tokens=24),
    ]
    jobs = [(p, [None, *adapters][k % 4], kinds[k % 4]) for k, p in enumerate(PROMPTS * 2)]
    results = _concurrently(gen, jobs)
    for k, (prompt, adapter, params) in enumerate(jobs):  # the unbatched loop (`_decode`)
        ids = gen._encode(prompt, adapter)
        text = _TextStream(base.tokenizer, params, adapter is not None)
        assert "".join(gen._locked(ids, params, adapter, text)) == results[k], k
    prompt, adapter, params = jobs[0]
    other = gen.generate(prompt, replace(params, seed=99), adapter).candidates[0].text
    assert other != results[0]


def test_a_full_batch_hands_out_tokens_in_chunks_of_stream_every(base: LoadedBase) -> None:
    """With `STREAM_ROWS` rows or more, a row's tokens reach its asyncio loop `STREAM_EVERY` at
    a time (its first at once), as one batch of the handle each: the same tokens, in order, as
    a request alone, in fewer hand-outs."""
    fast = FastGemma3(base.config, base.weights)
    # no EOS: every row makes all its tokens; every prompt prefilled in the first step
    scheduler = BatchScheduler(fast, eos_ids=[], prompt_tokens=100_000)
    params = GenerationParams(max_output_tokens=9)
    prompts = [base.tokenizer(p)["input_ids"] for p in PROMPTS] * 4  # 24 rows
    assert len(prompts) >= STREAM_ROWS

    async def run() -> list[list[list[int]]]:
        loop = asyncio.get_running_loop()
        with scheduler._cond:  # all waiting before the decode thread's first step
            handles = [scheduler.submit(ids, None, params, loop) for ids in prompts]

        async def batches(handle: Handle) -> list[list[int]]:
            return [tokens async for tokens in handle.batches()]

        return await asyncio.gather(*(batches(h) for h in handles))

    got = asyncio.run(run())
    assert scheduler.peak_rows == len(prompts)
    alone = BatchScheduler(fast, eos_ids=[])
    try:
        for ids, batches in zip(prompts, got, strict=True):
            assert [t for b in batches for t in b] == list(alone.submit(ids, None, params)), ids
            assert batches[0] == batches[0][:1]  # the first token on its own
            assert len(batches) <= 1 + -(-(params.max_output_tokens - 1) // STREAM_EVERY)
    finally:
        scheduler.close()
        alone.close()


def test_closing_a_stream_frees_its_row(base: LoadedBase, adapters: list[Path]) -> None:
    gen = Generator(base, backend=Backend.FAST)
    stream = gen.stream(PROMPTS[0], GenerationParams(max_output_tokens=2000), adapters[0])
    next(stream)
    scheduler = gen._batcher
    assert isinstance(scheduler, BatchScheduler) and scheduler.pending() == 1
    stream.close()  # what the API does when the client goes away
    deadline = time.monotonic() + 10
    while scheduler.pending() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.pending() == 0
    again = gen.generate(PROMPTS[0], GenerationParams(max_output_tokens=3), adapters[0])
    assert again.candidates[0].token_count == 3


def test_close_ends_the_decode_thread_and_fails_running_requests(
    base: LoadedBase, adapters: list[Path]
) -> None:
    gen = Generator(base, backend=Backend.FAST)
    stream = gen.stream(PROMPTS[0], GenerationParams(max_output_tokens=2000), adapters[0])
    next(stream)
    scheduler = gen._batcher
    assert isinstance(scheduler, BatchScheduler)
    decode_thread = scheduler._thread
    assert decode_thread is not None and decode_thread.is_alive()
    scheduler.close()  # what process exit does (atexit)
    assert not decode_thread.is_alive()
    with pytest.raises(RuntimeError, match="shutting down"):
        for _ in stream:
            pass
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.submit([2, 3], None, GenerationParams(max_output_tokens=1))


def test_each_step_decodes_with_the_thread_count_it_is_given(
    base: LoadedBase, adapters: list[Path]
) -> None:
    from tunery.api.app import decode_thread_policy

    before = torch.get_num_threads()
    in_use: list[int] = []  # the decode thread's count each time it asks (OpenMP's is per thread)

    def one_thread() -> int:
        in_use.append(torch.get_num_threads())
        return 1

    gen = Generator(base, backend=Backend.FAST, decode_threads=one_thread)
    out = gen.generate(PROMPTS[0], GenerationParams(max_output_tokens=3), adapters[0])
    assert out.candidates[0].token_count == 3
    assert len(in_use) >= 3  # asked before every step
    assert set(in_use[1:]) == {1}  # and the steps after the first ran with one thread

    jobs = [0]
    policy = decode_thread_policy(None, lambda: jobs[0])
    assert policy is not None and policy() == before
    jobs[0] = 1
    assert policy() == max(1, before // 2)
    assert decode_thread_policy(2, lambda: 1) is None  # a count set by hand stays
    assert decode_thread_policy(None, None) is None  # no workers on these cores
