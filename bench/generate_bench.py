"""Generation speed: Tunery's `Generator` on each decode backend (reference, fast, fast-int8, and
llama-cpp when llama-cpp-python is installed) vs transformers' `model.generate` (fp32 and bf16)
and plain llama.cpp (its own decode loop and greedy sampler on the same GGUF), in one process, on
the same base model and the same ~100-token prompt, greedy. `--adapter DIR` applies a tuned
model's adapter (PEFT folder) on every Tunery side. The llama-cpp backend runs twice: with prompt
lookup (its default: drafts verified several tokens a forward, `engine.lookup`) and without.

Each side is timed twice per repeat: with 1 output token (time to first token: prompt prefill plus
one step) and with N. Decode tokens/s is (tokens after the first) / (T_N - T_1); the median of
`--repeats` runs is reported, after one warm-up run each, the sides taking turns.

    python bench/generate_bench.py [--data-dir DIR] [--adapter DIR] [--max-tokens 128]
                                   [--repeats 3] [--threads N]

The ratios of each backend to the best transformers side follow, then to llama.cpp; the last line
is the decode speed ratio of the best Tunery backend to llama.cpp (or, without llama-cpp-python,
of the Generator's default backend to transformers).
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tunery.engine.base_models import DEFAULT_BASE_MODEL, BaseModelRegistry
from tunery.engine.generate import Backend, Generator
from tunery.engine.specs import GenerationParams
from tunery.settings import Settings

OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")

# A plain-text opening a pretrained model keeps writing from (no early end of text).
PROMPT = (
    "The history of the lighthouse at the edge of the northern harbor begins in the winter of "
    "1852, when a storm drove three fishing boats onto the rocks below the cliffs. The town "
    "council met the following spring and agreed to build a tower of local granite, paid for by "
    "a tax on every barrel of herring landed at the quay. The first keeper, a retired sailor named "
    "Thomas Hale, lit the lamp for the first time on a calm evening in October, and for the next "
    "forty years he kept a journal of every ship that passed. In his journal he wrote that"
)

# One side: a function of max new tokens → tokens actually generated.
Decode = Callable[[int], int]


@dataclass(frozen=True)
class Timing:
    name: str
    ttft: float  # seconds to the first token
    decode_tps: float  # tokens/s after the first
    tokens: int


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def time_sides(sides: list[tuple[str, Decode]], max_tokens: int, repeats: int) -> list[Timing]:
    """Median TTFT and decode speed per side over `repeats`, after one warm-up of each length.

    The sides take turns within each repeat, so a machine that gets busier or quieter during the
    run skews them alike.
    """
    for _, decode in sides:
        decode(1)
        decode(max_tokens)
    firsts: dict[str, list[float]] = {name: [] for name, _ in sides}
    rates: dict[str, list[float]] = {name: [] for name, _ in sides}
    counts: dict[str, int] = {}
    for _ in range(repeats):
        for name, decode in sides:
            start = time.perf_counter()
            decode(1)
            t1 = time.perf_counter() - start
            start = time.perf_counter()
            counts[name] = decode(max_tokens)
            tn = time.perf_counter() - start
            firsts[name].append(t1)
            rates[name].append((counts[name] - 1) / max(tn - t1, 1e-9))
    return [
        Timing(name, statistics.median(firsts[name]), statistics.median(rates[name]), counts[name])
        for name, _ in sides
    ]


def tunery_side(generator: Generator, adapter: Path | None) -> Decode:
    def decode(n: int) -> int:
        result = generator.generate(PROMPT, GenerationParams(max_output_tokens=n), adapter)
        return int(result.candidates[0].token_count)

    return decode


def llama_cpp_side(
    gguf: Path, prompt_ids: list[int], eos: set[int], lora: Path | None = None
) -> Decode:
    """llama.cpp alone: its model, context, decode loop and greedy sampler, with the GGUF LoRA
    `lora` applied (no Tunery code runs). Extra buffer types are off, as in Tunery's backend
    (their AMX kernel crashes here)."""
    import ctypes

    import llama_cpp as lc

    lc.llama_backend_init()
    params = lc.llama_model_default_params()
    params.use_extra_bufts = False
    model = lc.llama_model_load_from_file(str(gguf).encode(), params)
    cparams = lc.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch = 1024, 512
    cparams.n_threads = cparams.n_threads_batch = torch.get_num_threads()
    ctx = lc.llama_init_from_model(model, cparams)
    if lora is not None:
        handle = lc.llama_adapter_lora_init(model, str(lora).encode())
        adapters = (lc.llama_adapter_lora_p_ctypes * 1)(handle)
        lc.llama_set_adapters_lora(ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
    sampler = lc.llama_sampler_init_greedy()
    prompt = (lc.llama_token * len(prompt_ids))(*prompt_ids)
    one = (lc.llama_token * 1)()

    def decode(n: int) -> int:
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        lc.llama_decode(ctx, lc.llama_batch_get_one(prompt, len(prompt_ids)))
        for produced in range(1, n + 1):
            one[0] = lc.llama_sampler_sample(sampler, ctx, -1)
            if one[0] in eos or produced == n:
                return produced
            lc.llama_decode(ctx, lc.llama_batch_get_one(one, 1))
        return n

    decode.keep = (model, ctx, sampler)  # type: ignore[attr-defined]
    return decode


def hf_side(model: object, input_ids: torch.Tensor) -> Decode:
    @torch.inference_mode()
    def decode(n: int) -> int:
        out = model.generate(  # type: ignore[attr-defined]
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=n,
            do_sample=False,
        )
        return int(out.shape[1] - input_ids.shape[1])

    return decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="default: TUNERY_DATA_DIR")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--adapter", type=Path, default=None, help="a tuned PEFT adapter folder")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in OFFLINE:  # the benches never touch the network
        os.environ[name] = "1"
    settings = Settings(data_dir=args.data_dir) if args.data_dir else Settings()

    from transformers import AutoModelForCausalLM

    base = BaseModelRegistry(settings.models_dir, device=settings.device).load(DEFAULT_BASE_MODEL)
    input_ids = base.tokenizer(PROMPT, return_tensors="pt")["input_ids"].to(base.device)
    print(
        f"prompt {input_ids.shape[1]} tokens, up to {args.max_tokens} new, greedy; "
        f"{torch.get_num_threads()} threads, cpu {torch.backends.cpu.get_cpu_capability()}"
    )

    from tunery.engine import llamacpp

    # Each generator owns the model once PEFT wraps it for an adapter (the reference backend).
    backends = [b for b in Backend if b is not Backend.LLAMA_CPP or llamacpp.installed()]
    default = Backend(inspect.signature(Generator).parameters["backend"].default)
    sides = [
        (
            f"tunery {b} ({dtype_name(base.dtype)})",
            tunery_side(Generator(base, backend=b), args.adapter),
        )
        for b in backends
    ]
    if Backend.LLAMA_CPP in backends:  # what prompt lookup adds (`engine.lookup`)
        plain = Generator(base, backend=Backend.LLAMA_CPP, prompt_lookup=False)
        sides.append((f"tunery {Backend.LLAMA_CPP}, no lookup", tunery_side(plain, args.adapter)))
    n_ours = len(sides)
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(base.model_dir, dtype=dtype).to(base.device)
        model.eval()
        sides.append((f"transformers ({dtype_name(dtype)})", hf_side(model, input_ids)))

    gguf = base.gguf() if llamacpp.installed() else None
    if gguf is not None:
        tok = base.tokenizer
        eos = {tok.eos_token_id, *tok.convert_tokens_to_ids(["<end_of_turn>"])}
        lora = None
        prompt_ids = input_ids[0].tolist()
        if args.adapter is not None:  # the same adapter, as Tunery writes it for llama.cpp
            from tunery.engine.data import encode_prompt
            from tunery.engine.fast_decode import FastGemma3

            lora = llamacpp.adapter_gguf(
                args.adapter.resolve(), FastGemma3(base.config, base.weights), "gemma3"
            )
            prompt_ids = encode_prompt(tok, PROMPT)  # the tuned model's prompt template
        name = "llama.cpp (GGUF" + (" + LoRA)" if lora else ")")
        sides.append((name, llama_cpp_side(gguf, prompt_ids, eos, lora)))

    timings = time_sides(sides, args.max_tokens, args.repeats)
    ours, theirs = timings[:n_ours], timings[n_ours:]
    reference = next((t for t in theirs if t.name.startswith("llama.cpp")), None)
    theirs = [t for t in theirs if t is not reference]
    for t in timings:
        print(
            f"{t.name:<32} TTFT {t.ttft * 1000:7.1f} ms  decode {t.decode_tps:7.1f} tokens/s"
            f"  ({t.tokens} tokens)"
        )
    best = max(theirs, key=lambda t: t.decode_tps)
    last = ours[backends.index(default)]
    for t in [*(t for t in ours if t is not last), last]:
        print(f"ratio {t.name}/{best.name} TTFT: {t.ttft / best.ttft:.2f}")
        print(f"ratio {t.name}/{best.name} decode tokens/s: {t.decode_tps / best.decode_tps:.2f}")
    if reference is not None:
        fastest = max(ours, key=lambda t: t.decode_tps)
        for t in [*(t for t in ours if t is not fastest), fastest]:
            ratio = t.decode_tps / reference.decode_tps
            print(f"ratio {t.name}/{reference.name} decode tokens/s: {ratio:.2f}")


if __name__ == "__main__":
    main()
