"""Inference: resolve a model name to a base model (+ a tuned adapter) and run the engine on it.

One `Generator` per base model, built on first use; on the fast backend it batches concurrent
requests for any tuned models into one decode step (FastAPI runs sync routes in its thread pool,
each waiting on its own request), else it serializes them on its model. Many tuned models share
one base in memory.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tunery.domain import JobState, ModelState, TunedModel
from tunery.engine.base_models import BaseModelInfo, BaseModelRegistry, short_name
from tunery.engine.generate import Backend, Generator
from tunery.engine.specs import MAX_INPUT_CHARS, Generation, GenerationParams, StreamChunk
from tunery.errors import FailedPrecondition, InvalidArgument, NotFound
from tunery.service.tuning import TuningService

# Tuned adapters kept loaded per base model (LRU); the default rank-16 MLP LoRA on gemma-3-270m
# is ~10 MB each in memory (fp32, as its file), so 128 is ~1.3 GB at most.
MAX_LOADED_ADAPTERS = 128


@dataclass(frozen=True)
class Resolved:
    """What serves a model name: its base model and, for a tuned model, the adapter and model."""

    name: str  # "models/x" or "tunedModels/y", as the caller should see it
    base: BaseModelInfo
    tuned: TunedModel | None = None
    adapter_dir: Path | None = None

    @property
    def default_temperature(self) -> float:
        tuned = self.tuned.temperature if self.tuned else None
        return self.base.temperature if tuned is None else tuned

    @property
    def default_top_p(self) -> float:
        tuned = self.tuned.top_p if self.tuned else None
        return self.base.top_p if tuned is None else tuned

    @property
    def default_top_k(self) -> int:
        tuned = self.tuned.top_k if self.tuned else None
        return self.base.top_k if tuned is None else tuned


class InferenceService:
    """generateContent / streamGenerateContent / countTokens over base and tuned models."""

    def __init__(
        self,
        registry: BaseModelRegistry,
        tuning: TuningService,
        max_loaded_adapters: int = MAX_LOADED_ADAPTERS,
        decode_threads: Callable[[], int] | None = None,
        backend: Backend | str = Backend.FAST,
        prompt_lookup: bool = True,
        native_kernels: bool = True,
    ) -> None:
        self.registry = registry
        self.tuning = tuning
        self.max_loaded_adapters = max_loaded_adapters
        self.decode_threads = decode_threads  # torch threads per batched decode step
        self.backend = Backend(backend)
        self.prompt_lookup = prompt_lookup
        self.native_kernels = native_kernels
        self._generators: dict[str, Generator] = {}
        self._generators_lock = threading.Lock()

    # -- start-up ------------------------------------------------------------------------------
    def preload(self, base_model: str) -> None:
        """Load `base_model`, build its Generator and run one 1-token decode, so the first request
        pays for none of it (weights, lazy kernel set-up). Blocking; call it from a thread."""
        generator = self._generator(self.registry.get(base_model))
        generator.generate("Hello", GenerationParams(max_output_tokens=1))

    def is_loaded(self, base_model: str) -> bool:
        with self._generators_lock:
            return short_name(base_model) in self._generators

    # -- names ---------------------------------------------------------------------------------
    def resolve(self, model_name: str, owner: str | None) -> Resolved:
        """ "models/x" or "tunedModels/y" → what serves it; NotFound, or FailedPrecondition while
        a tuned model is not ACTIVE."""
        if model_name.startswith("tunedModels/"):
            return self._resolve_tuned(model_name.removeprefix("tunedModels/"), owner)
        name = model_name if model_name.startswith("models/") else f"models/{model_name}"
        try:
            base = self.registry.get(name)
        except NotFound:
            raise NotFound(
                f"{name} is not found for API version v1beta, or is not supported for "
                "generateContent. Call ListModels to see the list of available models and "
                "their supported methods."
            ) from None
        return Resolved(name=base.resource_name, base=base)

    def _resolve_tuned(self, model_id: str, owner: str | None) -> Resolved:
        tuned = self.tuning.get(model_id, owner, snapshots=False)
        if tuned.state is ModelState.CREATING:
            percent = tuned.job.completed_percent if tuned.job else 0.0
            raise FailedPrecondition(
                f"{tuned.name} is not ready: its tuning job is still running ({percent:.0f}% done)"
            )
        if tuned.state is ModelState.FAILED:
            job = tuned.job
            if job is not None and job.state is JobState.CANCELLED:
                reason = "its tuning job was cancelled"
            else:
                reason = (
                    f"its tuning job failed: {job.error if job and job.error else 'unknown error'}"
                )
            raise FailedPrecondition(f"{tuned.name} cannot be used: {reason}")
        base = self.registry.get(tuned.base_model)
        return Resolved(
            name=tuned.name, base=base, tuned=tuned, adapter_dir=self.tuning.adapter_dir(tuned.id)
        )

    # -- engine calls --------------------------------------------------------------------------
    def generate(
        self, model: str | Resolved, owner: str | None, prompt: str, params: GenerationParams
    ) -> Generation:
        """`model`: a name, or what `resolve()` made of it (the route has resolved it already)."""
        resolved = self._resolve_for_input(model, owner, prompt)
        generator = self._generator(resolved.base)
        return generator.generate(prompt, params, adapter_dir=resolved.adapter_dir)

    def stream(
        self, model: str | Resolved, owner: str | None, prompt: str, params: GenerationParams
    ) -> Iterator[StreamChunk]:
        """Resolves and validates now (so errors come before the first chunk), streams lazily."""
        resolved = self._resolve_for_input(model, owner, prompt)
        generator = self._generator(resolved.base)
        return generator.stream(prompt, params, adapter_dir=resolved.adapter_dir)

    def stream_async(
        self, model: str | Resolved, owner: str | None, prompt: str, params: GenerationParams
    ) -> AsyncGenerator[StreamChunk, None] | Iterator[StreamChunk]:
        """`stream` for an asyncio caller: see `Generator.stream_async` (blocking: call it on a
        worker thread)."""
        resolved = self._resolve_for_input(model, owner, prompt)
        generator = self._generator(resolved.base)
        return generator.stream_async(prompt, params, adapter_dir=resolved.adapter_dir)

    def count_tokens(self, model: str | Resolved, owner: str | None, prompt: str) -> int:
        resolved = model if isinstance(model, Resolved) else self.resolve(model, owner)
        generator = self._generator(resolved.base)
        return generator.count_tokens(prompt, adapter_dir=resolved.adapter_dir)

    def _resolve_for_input(self, model: str | Resolved, owner: str | None, prompt: str) -> Resolved:
        resolved = model if isinstance(model, Resolved) else self.resolve(model, owner)
        if resolved.tuned is not None and len(prompt) > MAX_INPUT_CHARS:
            raise InvalidArgument(
                f"the input has {len(prompt):,} characters; the limit for tuned models is "
                f"{MAX_INPUT_CHARS:,}"
            )
        return resolved

    def _generator(self, base: BaseModelInfo) -> Generator:
        """The base model's generator, loading the weights on first use.

        The weights load outside the lock (the registry loads each name once), so a request for
        one base never waits for another base to load; only the Generator is made under it, so
        there is one per base.
        """
        with self._generators_lock:
            generator = self._generators.get(base.name)
        if generator is not None:
            return generator
        loaded = self.registry.load(base.name)
        with self._generators_lock:
            if base.name not in self._generators:
                self._generators[base.name] = Generator(
                    loaded,
                    max_adapters=self.max_loaded_adapters,
                    decode_threads=self.decode_threads,
                    backend=self.backend,
                    prompt_lookup=self.prompt_lookup,
                    native_kernels=self.native_kernels,
                )
            return self._generators[base.name]
