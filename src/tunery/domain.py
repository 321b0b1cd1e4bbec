"""Domain objects shared by store, service, worker and api: frozen dataclasses and enums."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class ModelState(StrEnum):
    """A tuned model's state, as the Gemini API names it."""

    CREATING = "CREATING"
    ACTIVE = "ACTIVE"
    FAILED = "FAILED"


class JobState(StrEnum):
    """A tuning job's state; the tuned model mirrors it (see `model_state`)."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def done(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    @property
    def model_state(self) -> ModelState:
        if self is JobState.SUCCEEDED:
            return ModelState.ACTIVE
        if self in (JobState.FAILED, JobState.CANCELLED):
            return ModelState.FAILED
        return ModelState.CREATING


@dataclass(frozen=True)
class Hyperparameters:
    epoch_count: int
    batch_size: int
    learning_rate: float | None = None
    learning_rate_multiplier: float | None = None


@dataclass(frozen=True)
class Snapshot:
    """One optimizer step's record (Gemini TuningSnapshot) plus our validation loss."""

    step: int
    epoch: int
    mean_loss: float
    compute_time: datetime
    validation_loss: float | None = None


@dataclass(frozen=True)
class TuningJob:
    """The training work behind one tuned model; `id` is the operation id."""

    id: str
    tuned_model_id: str
    state: JobState
    total_steps: int
    completed_steps: int
    create_time: datetime
    start_time: datetime | None = None
    complete_time: datetime | None = None
    error: str | None = None
    worker_id: str | None = None
    lease_expires: datetime | None = None
    cancel_requested: bool = False
    attempts: int = 0  # workers that took it on; more than one means one died or was stopped

    @property
    def completed_percent(self) -> float:
        if self.state is JobState.SUCCEEDED:
            return 100.0
        if self.total_steps <= 0:
            return 0.0
        return round(100.0 * self.completed_steps / self.total_steps, 2)


@dataclass(frozen=True)
class TunedModel:
    """A tuned model resource (`tunedModels/{id}`) with its job and snapshots."""

    id: str
    display_name: str
    description: str
    base_model: str  # e.g. "models/gemma-3-270m"
    state: ModelState
    create_time: datetime
    update_time: datetime
    hyperparameters: Hyperparameters
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    owner_key: str | None = None  # hash of the API key that created it; None: open access
    job: TuningJob | None = None
    snapshots: tuple[Snapshot, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return f"tunedModels/{self.id}"
