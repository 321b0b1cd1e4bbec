"""generateContent, streamGenerateContent and countTokens bodies."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from tunery.api.schemas.wire import WireIn, WireOut
from tunery.engine.specs import FinishReason, Generation, StreamChunk


class PartIn(WireIn):
    """A content part; only `text` is supported, anything else is kept to reject by name."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")
    text: str | None = None


class ContentIn(WireIn):
    role: str | None = None
    parts: list[PartIn] = Field(default_factory=list)


class GenerationConfigIn(WireIn):
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_output_tokens: int | None = None
    stop_sequences: list[str] | None = None
    candidate_count: int | None = None
    seed: int | None = None
    response_mime_type: str | None = None
    response_schema: dict[str, Any] | None = None
    response_json_schema: Any | None = None


class GenerateContentRequest(WireIn):
    contents: list[ContentIn] = Field(default_factory=list)
    system_instruction: ContentIn | None = None
    generation_config: GenerationConfigIn | None = None


class CountTokensRequest(WireIn):
    contents: list[ContentIn] = Field(default_factory=list)
    generate_content_request: GenerateContentRequest | None = None


class CountTokensResponse(WireOut):
    total_tokens: int


class PartOut(WireOut):
    text: str


class ContentOut(WireOut):
    role: str = "model"
    parts: list[PartOut]


class CandidateOut(WireOut):
    content: ContentOut
    finish_reason: str | None = None
    index: int

    @classmethod
    def of(cls, text: str, finish_reason: FinishReason | None, index: int) -> CandidateOut:
        return cls(
            content=ContentOut(parts=[PartOut(text=text)]),
            finish_reason=finish_reason.value if finish_reason else None,
            index=index,
        )


class UsageMetadata(WireOut):
    prompt_token_count: int
    candidates_token_count: int
    total_token_count: int

    @classmethod
    def of(cls, prompt_tokens: int, output_tokens: int) -> UsageMetadata:
        return cls(
            prompt_token_count=prompt_tokens,
            candidates_token_count=output_tokens,
            total_token_count=prompt_tokens + output_tokens,
        )


class GenerateContentResponse(WireOut):
    candidates: list[CandidateOut]
    usage_metadata: UsageMetadata | None = None
    model_version: str
    response_id: str

    @classmethod
    def from_generation(
        cls, g: Generation, model: str, response_id: str
    ) -> GenerateContentResponse:
        return cls(
            candidates=[
                CandidateOut.of(c.text, c.finish_reason, i) for i, c in enumerate(g.candidates)
            ],
            usage_metadata=UsageMetadata.of(
                g.prompt_token_count, sum(c.token_count for c in g.candidates)
            ),
            model_version=model,
            response_id=response_id,
        )

    @classmethod
    def from_chunk(cls, c: StreamChunk, model: str, response_id: str) -> GenerateContentResponse:
        """One streamed piece; the last carries the finish reason and cumulative usage."""
        usage = None
        if c.finish_reason is not None:
            usage = UsageMetadata.of(c.prompt_token_count, c.output_token_count)
        return cls(
            candidates=[CandidateOut.of(c.text, c.finish_reason, 0)],
            usage_metadata=usage,
            model_version=model,
            response_id=response_id,
        )
