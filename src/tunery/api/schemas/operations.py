"""Long-running operations `tunedModels/{id}/operations/{job}` that track tuning jobs."""

from __future__ import annotations

from pydantic import Field

from tunery.api.errors import GRPC_CODES
from tunery.api.schemas.tuned_models import SnapshotOut, TunedModelResource
from tunery.api.schemas.wire import WireOut
from tunery.domain import JobState, TunedModel, TuningJob

METADATA_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1beta.CreateTunedModelMetadata"
TUNED_MODEL_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1beta.TunedModel"


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
