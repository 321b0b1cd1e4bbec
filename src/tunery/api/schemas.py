"""Wire models of the Gemini REST surface, split by direction: requests in, resources out.

Requests accept lowerCamelCase and proto snake_case keys alike and ignore fields we do not use;
responses are lowerCamelCase with `None` fields left out. Conversions to and from the domain live
beside the model they build, so routes stay thin.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_serializer
from pydantic.alias_generators import to_camel
from pydantic_core.core_schema import SerializerFunctionWrapHandler

from tunery.api.errors import GRPC_CODES
from tunery.domain import JobState, Snapshot, TunedModel, TuningJob
from tunery.engine.base_models import BaseModelInfo
from tunery.engine.specs import DEFAULT_LEARNING_RATE, Generation, StreamChunk

METADATA_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1beta.CreateTunedModelMetadata"
TUNED_MODEL_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1beta.TunedModel"
SUPPORTED_METHODS = ["generateContent", "countTokens", "createTunedModel"]


class WireIn(BaseModel):
    """A request body: camelCase or snake_case keys, unknown keys ignored."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class WireOut(BaseModel):
    """A response body: camelCase keys, `None` fields omitted."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None}


def rfc3339(value: datetime | None) -> str | None:
    """A timestamp as Google writes it (`2025-01-02T03:04:05.123456Z`); naive means UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


# --- base models ---------------------------------------------------------------------------


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


# --- tuned models: requests ----------------------------------------------------------------


class TuningExampleIn(WireIn):
    """`{"textInput", "output"}`; other keys (e.g. multi-turn `contents`) are kept to reject."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")
    text_input: str | None = None
    output: str | None = None


class TuningExamplesIn(WireIn):
    examples: list[TuningExampleIn] = Field(default_factory=list)


class DatasetIn(WireIn):
    examples: TuningExamplesIn | None = None


class HyperparametersIn(WireIn):
    epoch_count: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    learning_rate_multiplier: float | None = None


class TuningTaskIn(WireIn):
    training_data: DatasetIn | None = None
    hyperparameters: HyperparametersIn | None = None


class TunedModelSourceIn(WireIn):
    tuned_model: str | None = None


class TunedModelCreate(WireIn):
    """POST /tunedModels body (a TunedModel with its input-only training data)."""

    display_name: str = ""
    description: str = ""
    base_model: str | None = None
    tuned_model_source: TunedModelSourceIn | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    tuning_task: TuningTaskIn | None = None


class TunedModelPatch(WireIn):
    """PATCH /tunedModels/{id} body; output-only fields a client echoes back are ignored."""

    display_name: str | None = None
    description: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None


# --- tuned models: resources ---------------------------------------------------------------


class SnapshotOut(WireOut):
    step: int
    epoch: int
    mean_loss: float
    compute_time: str | None

    @classmethod
    def from_domain(cls, s: Snapshot) -> SnapshotOut:
        return cls(
            step=s.step, epoch=s.epoch, mean_loss=s.mean_loss, compute_time=rfc3339(s.compute_time)
        )


class HyperparametersOut(WireOut):
    """Never `learningRateMultiplier`: the old SDK's decoder raises on it (reference §4.2)."""

    epoch_count: int
    batch_size: int
    learning_rate: float


class TuningTaskOut(WireOut):
    """Never `trainingData`: it is input-only (reference §2, §4.2)."""

    start_time: str | None = None
    complete_time: str | None = None
    snapshots: list[SnapshotOut] = Field(default_factory=list)
    hyperparameters: HyperparametersOut


class TunedModelResource(WireOut):
    name: str
    display_name: str
    description: str
    base_model: str
    state: str
    create_time: str | None
    update_time: str | None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    tuning_task: TuningTaskOut

    @classmethod
    def from_domain(cls, m: TunedModel) -> TunedModelResource:
        hp = m.hyperparameters
        rate = hp.learning_rate
        if rate is None:
            rate = DEFAULT_LEARNING_RATE * (hp.learning_rate_multiplier or 1.0)
        job = m.job
        return cls(
            name=m.name,
            display_name=m.display_name,
            description=m.description,
            base_model=m.base_model,
            state=m.state.value,
            create_time=rfc3339(m.create_time),
            update_time=rfc3339(m.update_time),
            temperature=m.temperature,
            top_p=m.top_p,
            top_k=m.top_k,
            tuning_task=TuningTaskOut(
                start_time=rfc3339(job.start_time) if job else None,
                complete_time=rfc3339(job.complete_time) if job else None,
                snapshots=[SnapshotOut.from_domain(s) for s in m.snapshots],
                hyperparameters=HyperparametersOut(
                    epoch_count=hp.epoch_count, batch_size=hp.batch_size, learning_rate=rate
                ),
            ),
        )


class TunedModelList(WireOut):
    tuned_models: list[TunedModelResource]
    next_page_token: str | None = None


# --- operations ----------------------------------------------------------------------------


class CreateTunedModelMetadata(WireOut):
    type_: str = Field(default=METADATA_TYPE, alias="@type")
    tuned_model: str
    total_steps: int
    completed_steps: int
    completed_percent: float
    snapshots: list[SnapshotOut] = Field(default_factory=list)


class TunedModelResponse(TunedModelResource):
    """A TunedModel inside an Operation, tagged with its `@type` for GAPIC clients."""

    type_: str = Field(default=TUNED_MODEL_TYPE, alias="@type")


class OperationError(WireOut):
    code: int  # google.rpc.Code, not HTTP
    message: str


class Operation(WireOut):
    """A long-running operation; once `done`, exactly one of `response` / `error` is set."""

    name: str
    metadata: CreateTunedModelMetadata
    done: bool
    response: TunedModelResponse | None = None
    error: OperationError | None = None


class OperationList(WireOut):
    operations: list[Operation]
    next_page_token: str | None = None


class Empty(WireOut):
    """`{}` (google.protobuf.Empty), e.g. for DELETE and cancel."""


# --- generation ----------------------------------------------------------------------------


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


class UsageMetadata(WireOut):
    prompt_token_count: int
    candidates_token_count: int
    total_token_count: int


class GenerateContentResponse(WireOut):
    candidates: list[CandidateOut]
    usage_metadata: UsageMetadata | None = None
    model_version: str
    response_id: str

    @classmethod
    def from_generation(
        cls, g: Generation, model: str, response_id: str
    ) -> GenerateContentResponse:
        out_tokens = sum(c.token_count for c in g.candidates)
        return cls(
            candidates=[
                CandidateOut(
                    content=ContentOut(parts=[PartOut(text=c.text)]),
                    finish_reason=c.finish_reason.value,
                    index=i,
                )
                for i, c in enumerate(g.candidates)
            ],
            usage_metadata=UsageMetadata(
                prompt_token_count=g.prompt_token_count,
                candidates_token_count=out_tokens,
                total_token_count=g.prompt_token_count + out_tokens,
            ),
            model_version=model,
            response_id=response_id,
        )

    @classmethod
    def from_chunk(cls, c: StreamChunk, model: str, response_id: str) -> GenerateContentResponse:
        """One streamed piece; the last carries the finish reason and cumulative usage."""
        usage = None
        if c.finish_reason is not None:
            usage = UsageMetadata(
                prompt_token_count=c.prompt_token_count,
                candidates_token_count=c.output_token_count,
                total_token_count=c.prompt_token_count + c.output_token_count,
            )
        return cls(
            candidates=[
                CandidateOut(
                    content=ContentOut(parts=[PartOut(text=c.text)]),
                    finish_reason=c.finish_reason.value if c.finish_reason else None,
                    index=0,
                )
            ],
            usage_metadata=usage,
            model_version=model,
            response_id=response_id,
        )


def operation_from_domain(m: TunedModel) -> Operation:
    """The Operation `tunedModels/{id}/operations/{job}` that tracks `m`'s tuning job."""
    job: TuningJob | None = m.job
    if job is None:
        raise ValueError(f"{m.name} has no tuning job")
    snapshots = [SnapshotOut.from_domain(s) for s in m.snapshots]
    op = Operation(
        name=f"{m.name}/operations/{job.id}",
        metadata=CreateTunedModelMetadata(
            tuned_model=m.name,
            total_steps=job.total_steps,
            completed_steps=job.completed_steps,
            completed_percent=job.completed_percent,
            snapshots=snapshots,
        ),
        done=job.state.done,
    )
    if job.state is JobState.SUCCEEDED:
        op.response = TunedModelResponse(**dict(TunedModelResource.from_domain(m)))
    elif job.state is JobState.CANCELLED:
        op.error = OperationError(
            code=GRPC_CODES["CANCELLED"], message="the tuning job was cancelled"
        )
    elif job.state is JobState.FAILED:
        op.error = OperationError(
            code=GRPC_CODES["INTERNAL"], message=job.error or "the tuning job failed"
        )
    return op
