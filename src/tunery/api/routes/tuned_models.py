"""Tuned models and their tuning operations: create, list, get, patch, delete, cancel.

`POST tunedModels` answers with the long-running Operation `tunedModels/{id}/operations/{job}`;
clients then poll the tuned model (google-genai) or the operation (google-generativeai, REST).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from tunery.api.deps import Owner, Svc
from tunery.api.schemas.operations import Operation, OperationList, operation_from_domain
from tunery.api.schemas.tuned_models import (
    TunedModelCreate,
    TunedModelList,
    TunedModelPatch,
    TunedModelResource,
    TuningExampleIn,
)
from tunery.api.schemas.wire import Empty
from tunery.engine.specs import Example
from tunery.errors import InvalidArgument, NotFound
from tunery.service.tuning import CreateRequest

router = APIRouter(tags=["tunedModels"])

# PATCH paths (camelCase, as in an updateMask; snake_case accepted) → TuningService.patch keys.
MUTABLE_FIELDS = {
    "displayName": "display_name",
    "description": "description",
    "temperature": "temperature",
    "topP": "top_p",
    "topK": "top_k",
}
_TEXT_FIELDS = ("display_name", "description")
NO_TRAINING_DATA = (
    "tuningTask.trainingData is required: the request has no training examples. "
    "google-genai 1.47 and newer do not send the training examples; pin google-genai<=1.46, "
    "or send examples over REST (tuningTask.trainingData.examples.examples) or with `tunery tune`."
)


@router.post("/tunedModels", response_model=Operation)
def create_tuned_model(
    body: TunedModelCreate,
    svc: Svc,
    owner: Owner,
    tuned_model_id: Annotated[str | None, Query(alias="tunedModelId")] = None,
) -> Operation:
    """Validate the dataset and settings, queue a tuning job, and return its Operation."""
    model = svc.tuning.create(_create_request(body, tuned_model_id), owner)
    return operation_from_domain(model)


@router.get("/tunedModels", response_model=TunedModelList)
def list_tuned_models(
    svc: Svc,
    owner: Owner,
    page_size: Annotated[int | None, Query(alias="pageSize")] = None,
    page_token: Annotated[str | None, Query(alias="pageToken")] = None,
    filter: str = "",
) -> TunedModelList:
    """The caller's tuned models, newest first; `filter` searches names and descriptions."""
    models, token = svc.tuning.list(owner, page_size, page_token or None, filter)
    return TunedModelList(
        tuned_models=[TunedModelResource.from_domain(m) for m in models],
        next_page_token=token or None,
    )


@router.get("/tunedModels/{model_id}", response_model=TunedModelResource)
def get_tuned_model(model_id: str, svc: Svc, owner: Owner) -> TunedModelResource:
    return TunedModelResource.from_domain(svc.tuning.get(model_id, owner))


@router.patch("/tunedModels/{model_id}", response_model=TunedModelResource)
def patch_tuned_model(
    model_id: str,
    body: TunedModelPatch,
    svc: Svc,
    owner: Owner,
    update_mask: Annotated[str | None, Query(alias="updateMask")] = None,
) -> TunedModelResource:
    """With `updateMask`, set exactly those fields; without one, the mutable fields present."""
    changes = _changes(body, update_mask)
    return TunedModelResource.from_domain(svc.tuning.patch(model_id, owner, changes))


@router.delete("/tunedModels/{model_id}", response_model=Empty)
def delete_tuned_model(model_id: str, svc: Svc, owner: Owner) -> Empty:
    svc.tuning.delete(model_id, owner)
    return Empty()


@router.post("/tunedModels/{model_id}:cancel", response_model=Empty)
def cancel_tuning(model_id: str, svc: Svc, owner: Owner) -> Empty:
    """google-genai's `tunings.cancel` (not in the public proto; a convenience)."""
    svc.tuning.cancel(model_id, owner)
    return Empty()


@router.get("/tunedModels/{model_id}/operations", response_model=OperationList)
def list_operations(model_id: str, svc: Svc, owner: Owner) -> OperationList:
    model = svc.tuning.get(model_id, owner)
    return OperationList(operations=[operation_from_domain(model)] if model.job else [])


@router.get("/tunedModels/{model_id}/operations/{operation_id}", response_model=Operation)
def get_operation(model_id: str, operation_id: str, svc: Svc, owner: Owner) -> Operation:
    model = svc.tuning.get(model_id, owner)
    if model.job is None or model.job.id != operation_id:
        raise NotFound(f"{model.name}/operations/{operation_id} is not found")
    return operation_from_domain(model)


@router.post("/tunedModels/{model_id}/operations/{operation_id}:cancel", response_model=Empty)
def cancel_operation(model_id: str, operation_id: str, svc: Svc, owner: Owner) -> Empty:
    get_operation(model_id, operation_id, svc, owner)
    svc.tuning.cancel(model_id, owner)
    return Empty()


def _create_request(body: TunedModelCreate, tuned_model_id: str | None) -> CreateRequest:
    if body.tuned_model_source is not None:
        raise InvalidArgument(
            "tunedModelSource is not supported: tune from a base model (set baseModel)"
        )
    if not body.base_model:
        raise InvalidArgument("baseModel is required, e.g. models/gemma-3-270m")
    task = body.tuning_task
    data = task.training_data if task else None
    if data is None or data.examples is None:
        raise InvalidArgument(NO_TRAINING_DATA)
    hp = task.hyperparameters if task else None
    return CreateRequest(
        base_model=body.base_model,
        examples=_examples(data.examples.examples),
        display_name=body.display_name,
        description=body.description,
        tuned_model_id=tuned_model_id or None,
        epoch_count=hp.epoch_count if hp else None,
        batch_size=hp.batch_size if hp else None,
        learning_rate=hp.learning_rate if hp else None,
        learning_rate_multiplier=hp.learning_rate_multiplier if hp else None,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
    )


def _examples(items: list[TuningExampleIn]) -> tuple[Example, ...]:
    """Single-turn text pairs only; the service checks lengths (messages are 1-based too)."""
    examples = []
    for n, item in enumerate(items, start=1):
        if item.model_extra:
            keys = ", ".join(sorted(item.model_extra))
            raise InvalidArgument(
                f"example {n}: only single-turn text examples {{textInput, output}} are "
                f"supported; it has {keys} (multi-turn and non-text examples are not supported)"
            )
        if item.text_input is None or item.output is None:
            missing = "textInput" if item.text_input is None else "output"
            raise InvalidArgument(f"example {n}: {missing} is missing")
        examples.append(Example(text_input=item.text_input, output=item.output))
    return tuple(examples)


def _changes(body: TunedModelPatch, update_mask: str | None) -> dict[str, object]:
    given = {_to_camel(f) for f in body.model_fields_set}
    if update_mask is None or not update_mask.strip():
        paths = {p for p in given if p in MUTABLE_FIELDS}
    else:
        paths = {_to_camel(p.strip()) for p in update_mask.split(",") if p.strip()}
        unknown = sorted(paths - MUTABLE_FIELDS.keys())
        if unknown:
            raise InvalidArgument(
                f"updateMask: {', '.join(unknown)} cannot be updated; the mutable fields are "
                f"{', '.join(MUTABLE_FIELDS)}"
            )
    changes: dict[str, object] = {}
    for path in sorted(paths):
        field = MUTABLE_FIELDS[path]
        value = getattr(body, field)
        # A masked path absent from the body clears the field, as FieldMask semantics have it.
        changes[field] = "" if value is None and field in _TEXT_FIELDS else value
    return changes


def _to_camel(path: str) -> str:
    head, *rest = path.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)
