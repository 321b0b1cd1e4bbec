"""The rules of Tunery, between the api/cli and the store/engine. Knows nothing of HTTP.

Public surface (the api and cli call only this):

    from tunery.service.tuning import TuningService, CreateRequest
        CreateRequest(frozen dataclass): base_model: str, examples: tuple[Example, ...],
            display_name: str = "", description: str = "", tuned_model_id: str | None = None,
            epoch_count: int | None = None, batch_size: int | None = None,
            learning_rate: float | None = None, learning_rate_multiplier: float | None = None,
            temperature: float | None = None, top_p: float | None = None, top_k: int | None = None
        svc = TuningService(store, registry, adapters_dir)
        svc.create(req, owner) -> TunedModel          # validates everything, queues a job
        svc.get(model_id, owner) -> TunedModel         # NotFound for another owner's model
        svc.list(owner, page_size, page_token, filter="") -> tuple[list[TunedModel], str | None]
        svc.patch(model_id, owner, changes: dict[str, object]) -> TunedModel
            changes keys: display_name, description, temperature, top_p, top_k
        svc.delete(model_id, owner) -> None            # cancels a running job, removes files
        svc.cancel(model_id, owner) -> TunedModel
        svc.adapter_dir(model_id) -> Path              # where the worker writes the adapter

    from tunery.service.inference import InferenceService
        inf = InferenceService(registry, tuning_service)
        inf.resolve(model_name, owner) -> Resolved     # "models/x" or "tunedModels/y"; NotFound /
                                                       # FailedPrecondition while CREATING
        inf.generate(model_name, owner, prompt, params) -> Generation
        inf.stream(model_name, owner, prompt, params) -> Iterator[StreamChunk]
        inf.stream_async(model_name, owner, prompt, params)  # Generator.stream_async's
        inf.count_tokens(model_name, owner, prompt) -> int

`owner` is the hash of the caller's API key, or None when the server runs with open access.
"""
