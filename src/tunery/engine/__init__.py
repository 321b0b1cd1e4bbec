"""The engine: base-model loading, LoRA training and generation. Knows nothing of HTTP or SQL.

Public surface (everything else is internal):

    from tunery.engine.base_models import BaseModelRegistry, BaseModelInfo, LoadedBase
        registry = BaseModelRegistry(models_dir: Path, device: str = "auto")
        registry.list() -> list[BaseModelInfo]          # embedded "gemma-3-270m" first
        registry.get(name) -> BaseModelInfo             # name with or without "models/"; NotFound
        registry.register(name, path) -> BaseModelInfo  # HF model dir or .gguf file; persisted
        registry.load(name) -> LoadedBase               # cached per process; converts GGUF once
            # base.config, base.weights (by state-dict name), base.tokenizer; base.model, the
            # transformers causal LM, is built on first use around the same tensors (a Gemma 3
            # served on the fast forward never imports transformers' modelling code)
        registry.gguf_file(name) -> Path | None         # the GGUF it comes from (for llama.cpp)

    from tunery.engine.train import train, total_steps
        total_steps(n_examples, spec) -> int
        train(base, examples, spec, work_dir, on_step=None, should_stop=None) -> TrainResult
            resumes from work_dir's last checkpoint when there is one; the final PEFT adapter
            lands in work_dir / "adapter" (PEFT format; written to a temp dir, then renamed).
            LoRA layers come from engine/lora.py (lean, mixed precision), not PEFT's. On Gemma 3
            (the embedded model) the loss runs through engine/fast_train.py: each batch packed
            into one row with no padding, fused LoRA groups, pre-packed oneDNN weights, head
            logits only at label positions; other models through the transformers modules.

    from tunery.engine.generate import Generator, Backend
        gen = Generator(base, max_adapters=128, backend=Backend.FAST)
            # or REFERENCE / FAST_INT8 / LLAMA_CPP (engine/llamacpp.py: the base GGUF in
            # llama.cpp, adapters as GGUF LoRAs from engine/gguf_lora.py; optional extra;
            # greedy decodes verify prompt-lookup drafts from engine/lookup.py unless
            # prompt_lookup=False)
        gen.generate(prompt, params, adapter_dir=None) -> Generation
        gen.stream(prompt, params, adapter_dir=None) -> Iterator[StreamChunk]
        gen.stream_async(prompt, params, adapter_dir=None)
            -> AsyncGenerator[StreamChunk, None] (on the batch scheduler: its tokens come to the
               loop iterating it) | Iterator[StreamChunk] (the rest: iterate it on a thread)
        gen.count_tokens(prompt, adapter_dir=None) -> int
        On the FAST backend, single-candidate requests share one decode step per token across
        requests and adapters, new prompts prefilled together (engine/batching.py,
        engine/batch_decode.py, FastGemma3.prefill_many); its decode steps
        attend, add LoRA deltas and norm rows with C kernels (engine/native/, compiled once per
        machine with the system compiler) unless native_kernels=False or none compiles, and
        greedy rows pick their token through a packed int8 copy of the vocab head (the argmax
        of exact logits rounded to bf16; engine/native/head.c) where the CPU has AVX512-VNNI.
        With an adapter the prompt is wrapped in the training template (engine.data.format_prompt);
        without one it is sent to the base model as is.
"""
