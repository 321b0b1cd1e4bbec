"""Tuned models: the create and patch bodies, and `tunedModels/{id}` resources."""

from __future__ import annotations

from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from tunery.api.schemas.wire import WireIn, WireOut, rfc3339
from tunery.domain import Snapshot, TunedModel
from tunery.engine.specs import DEFAULT_LEARNING_RATE

# --- requests ------------------------------------------------------------------------------


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


# --- resources -----------------------------------------------------------------------------


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
