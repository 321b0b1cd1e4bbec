"""Base models: `models/{id}` resources and their list."""

from __future__ import annotations

from tunery.api.schemas.wire import WireOut
from tunery.engine.base_models import BaseModelInfo

SUPPORTED_METHODS = ["generateContent", "countTokens", "createTunedModel"]


class ModelResource(WireOut):
    name: str
    base_model_id: str
    version: str
    display_name: str
    description: str
    input_token_limit: int
    output_token_limit: int
    supported_generation_methods: list[str]
    temperature: float
    top_p: float
    top_k: int

    @classmethod
    def from_info(cls, info: BaseModelInfo) -> ModelResource:
        return cls(
            name=info.resource_name,
            base_model_id=info.name,
            version=info.version,
            display_name=info.display_name,
            description=info.description,
            input_token_limit=info.input_token_limit,
            output_token_limit=info.output_token_limit,
            supported_generation_methods=SUPPORTED_METHODS,
            temperature=info.temperature,
            top_p=info.top_p,
            top_k=info.top_k,
        )


class ModelList(WireOut):
    models: list[ModelResource]
    next_page_token: str | None = None
