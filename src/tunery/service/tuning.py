"""Tuned models and their jobs as the API sees them: validate and queue, read, page, patch, delete.

Every rule a user can break is checked here, before anything is stored or trained, with a
message naming the field or the example.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import math
import re
import secrets
import shutil
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tunery.datasets import validate_examples
from tunery.domain import Hyperparameters, JobState, ModelState, TunedModel, TuningJob
from tunery.engine.base_models import BaseModelInfo
from tunery.engine.specs import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCH_COUNT,
    Example,
    TrainSpec,
)
from tunery.engine.train import ADAPTER_DIR, total_steps
from tunery.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from tunery.store import Store
from tunery.store.models import PATCHABLE

TUNED_MODEL_ID = re.compile(r"[a-z]([a-z0-9-]{0,38}[a-z0-9])?")
MAX_DISPLAY_NAME = 40
MAX_TEMPERATURE = 2.0  # the Gemini API allows [0, 1]; our base models sample fine up to 2
DEFAULT_PAGE_SIZE = 10
TUNED_DEFAULT_TEMPERATURE = 0.0
MAX_PAGE_SIZE = 1000
SUFFIX_LEN = 6
_ALPHABET = string.ascii_lowercase + string.digits
_FIELD = {  # our names → the API's, for messages
    "display_name": "displayName",
    "description": "description",
    "temperature": "temperature",
    "top_p": "topP",
    "top_k": "topK",
}


class BaseModelLookup(Protocol):
    """The part of the engine's BaseModelRegistry this service needs."""

    def get(self, name: str) -> BaseModelInfo: ...


@dataclass(frozen=True)
class CreateRequest:
    """A `POST /v1beta/tunedModels` body, already parsed; None means "use the default"."""

    base_model: str
    examples: tuple[Example, ...]
    display_name: str = ""
    description: str = ""
    tuned_model_id: str | None = None
    epoch_count: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    learning_rate_multiplier: float | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None


class TuningService:
    """Create/get/list/patch/delete/cancel tuned models; the worker does the training."""

    def __init__(
        self,
        store: Store,
        registry: BaseModelLookup,
        adapters_dir: Path,
        *,
        max_unfinished_jobs_per_owner: int | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.adapters_dir = Path(adapters_dir)
        self.max_unfinished_jobs_per_owner = max_unfinished_jobs_per_owner

    # -- paths ---------------------------------------------------------------------------------
    def work_dir(self, model_id: str) -> Path:
        """The model's folder: training checkpoints and the final adapter."""
        return self.adapters_dir / model_id

    def adapter_dir(self, model_id: str) -> Path:
        """The final PEFT adapter the worker writes when tuning succeeds."""
        return self.work_dir(model_id) / ADAPTER_DIR

    # -- create --------------------------------------------------------------------------------
    def create(self, req: CreateRequest, owner: str | None) -> TunedModel:
        """Validate everything, then store the model with a QUEUED job for a worker."""
        base = self.registry.get(req.base_model)
        _check_examples(req.examples)
        _check_display_name(req.display_name)
        _check_no_nul("description", req.description)
        _check_sampling(req.temperature, req.top_p, req.top_k)
        spec = TrainSpec(
            epoch_count=DEFAULT_EPOCH_COUNT if req.epoch_count is None else req.epoch_count,
            batch_size=DEFAULT_BATCH_SIZE if req.batch_size is None else req.batch_size,
            learning_rate=req.learning_rate,
            learning_rate_multiplier=req.learning_rate_multiplier,
        )
        if req.tuned_model_id is not None:
            _check_tuned_model_id(req.tuned_model_id)
            if self.store.models.exists(req.tuned_model_id):
                raise AlreadyExists(f"tunedModels/{req.tuned_model_id} already exists")
        self._check_job_quota(owner)

        now = self.store.clock()
        model_id = req.tuned_model_id or self._new_model_id(req.display_name)
        job = TuningJob(
            id=_random_token(12),
            tuned_model_id=model_id,
            state=JobState.QUEUED,
            total_steps=total_steps(len(req.examples), spec),
            completed_steps=0,
            create_time=now,
        )
        model = TunedModel(
            id=model_id,
            display_name=req.display_name,
            description=req.description,
            base_model=base.resource_name,
            state=ModelState.CREATING,
            create_time=now,
            update_time=now,
            hyperparameters=Hyperparameters(
                epoch_count=spec.epoch_count,
                batch_size=spec.batch_size,
                # Show the rate that will be used when neither option was given.
                learning_rate=(
                    spec.effective_learning_rate if spec.learning_rate_multiplier is None else None
                ),
                learning_rate_multiplier=spec.learning_rate_multiplier,
            ),
            # A tuned model answers what it was taught: greedy unless asked otherwise (the
            # Gemini API copies the base model's sampling temperature instead).
            temperature=TUNED_DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            top_p=base.top_p if req.top_p is None else req.top_p,
            top_k=base.top_k if req.top_k is None else req.top_k,
            owner_key=owner,
        )
        created = self.store.models.create(model, job, req.examples)
        # Files under a new id are a deleted model's that a crash left behind: a checkpoint of
        # theirs must not be resumed as this model's.
        shutil.rmtree(self.work_dir(model_id), ignore_errors=True)
        return created

    def _new_model_id(self, display_name: str) -> str:
        stem = _slug(display_name) or "tuned-model"
        for _ in range(10):
            candidate = f"{stem}-{_random_token(SUFFIX_LEN)}"
            if not self.store.models.exists(candidate):
                return candidate
        raise AlreadyExists(f"could not find a free id for {display_name!r}; pass tunedModelId")

    def _check_job_quota(self, owner: str | None) -> None:
        limit = self.max_unfinished_jobs_per_owner
        if owner is None or limit is None:
            return
        if self.store.models.count_unfinished_jobs(owner) >= limit:
            raise ResourceExhausted(
                f"this API key already has {limit} tuning jobs queued or running; "
                "wait for one to finish or cancel one"
            )

    # -- read ----------------------------------------------------------------------------------
    def get(self, model_id: str, owner: str | None, snapshots: bool = True) -> TunedModel:
        """The caller's model; another owner's model is NotFound, as if it did not exist.
        `snapshots`=False leaves out its training snapshots (serving reads none)."""
        model_id = model_id.removeprefix("tunedModels/")
        if not TUNED_MODEL_ID.fullmatch(model_id):  # no such id can exist; spare the database
            raise NotFound(f"tunedModels/{model_id[:100]} is not found")
        model = self.store.models.get(model_id, snapshots)
        if model is None or model.owner_key != owner:
            raise NotFound(f"tunedModels/{model_id} is not found")
        return model

    def list(
        self, owner: str | None, page_size: int | None, page_token: str | None, filter: str = ""
    ) -> tuple[list[TunedModel], str | None]:
        """One page of the caller's models, newest first, and the next page's token (or None)."""
        if page_size is None or page_size == 0:
            page_size = DEFAULT_PAGE_SIZE
        if page_size < 0:
            raise InvalidArgument("`pageSize` must be >= 0")
        page_size = min(page_size, MAX_PAGE_SIZE)
        offset = _decode_page_token(page_token) if page_token else 0
        # One row more than asked tells us whether a next page exists without an empty page.
        _check_no_nul("filter", filter)
        rows = self.store.models.list(owner, offset, page_size + 1, filter.strip())
        if len(rows) > page_size:
            return rows[:page_size], _encode_page_token(offset + page_size)
        return rows, None

    def list_jobs(self, owner: str | None) -> builtins.list[TuningJob]:
        """The caller's tuning jobs, newest first (for `tunery jobs`)."""
        return self.store.jobs.list(owner)

    # -- change --------------------------------------------------------------------------------
    def patch(self, model_id: str, owner: str | None, changes: Mapping[str, object]) -> TunedModel:
        """Update display_name, description, temperature, top_p and/or top_k."""
        model = self.get(model_id, owner)
        unknown = sorted(set(changes) - PATCHABLE)
        if unknown:
            raise InvalidArgument(
                f"cannot update {', '.join(unknown)}; only displayName, description, "
                "temperature, topP and topK can be updated"
            )
        for key in ("display_name", "description"):
            if key in changes and not isinstance(changes[key], str):
                raise InvalidArgument(f"`{_FIELD[key]}` must be a string")
        display_name = changes.get("display_name", model.display_name)
        _check_display_name(str(display_name))
        _check_no_nul("description", str(changes.get("description", "")))
        top_k = _number(changes, "top_k", model.top_k)
        _check_sampling(
            _number(changes, "temperature", model.temperature),
            _number(changes, "top_p", model.top_p),
            None if top_k is None else int(top_k),
        )
        clean = (
            {**changes, "top_k": top_k if top_k is None else int(top_k)}
            if "top_k" in changes
            else changes
        )
        updated = self.store.models.update(model.id, clean, self.store.clock())
        if updated is None:
            raise NotFound(f"tunedModels/{model.id} is not found")
        return updated

    def cancel(self, model_id: str, owner: str | None) -> TunedModel:
        """Stop the model's tuning job: a queued job at once, a running one after its step."""
        model = self.get(model_id, owner)
        job = model.job
        if job is None:
            raise FailedPrecondition(f"{model.name} has no tuning job to cancel")
        if job.state in (JobState.SUCCEEDED, JobState.FAILED):
            raise FailedPrecondition(
                f"{model.name} has already finished tuning ({job.state.value}); "
                "there is nothing to cancel"
            )
        if job.state is not JobState.CANCELLED:
            self.store.jobs.request_cancel(job.id)
        return self.get(model.id, owner)

    def delete(self, model_id: str, owner: str | None) -> None:
        """Delete the model's rows and files; a running job is asked to stop first."""
        model = self.get(model_id, owner)
        if model.job is not None and not model.job.state.done:
            self.store.jobs.request_cancel(model.job.id)
        self.store.models.delete(model.id)
        shutil.rmtree(self.work_dir(model.id), ignore_errors=True)


# -- validation ----------------------------------------------------------------------------------


def _check_examples(examples: Sequence[Example]) -> None:
    if not examples:
        raise InvalidArgument(
            "the training dataset has no examples; "
            "send at least one in `tuningTask.trainingData.examples.examples`"
        )
    validate_examples(examples, label="example", input_name="textInput")
    for number, example in enumerate(examples, start=1):
        if "\x00" in example.text_input + example.output:
            raise InvalidArgument(f"example {number}: contains a NUL (\\u0000) character")


def _check_no_nul(field: str, text: str) -> None:
    # PostgreSQL cannot store NUL in text; no user means one, so refuse it on every database.
    if "\x00" in text:
        raise InvalidArgument(f"`{field}` must not contain NUL (\\u0000) characters")


def _check_display_name(display_name: str) -> None:
    _check_no_nul("displayName", display_name)
    if len(display_name) > MAX_DISPLAY_NAME:
        raise InvalidArgument(
            f"`displayName` has {len(display_name)} characters; the limit is {MAX_DISPLAY_NAME}"
        )


def _check_tuned_model_id(model_id: str) -> None:
    if not TUNED_MODEL_ID.fullmatch(model_id):
        raise InvalidArgument(
            f"`tunedModelId` {model_id!r} is not valid: use 1-40 lowercase letters, digits or "
            "'-', starting with a letter and not ending with '-'"
        )


def _check_sampling(temperature: float | None, top_p: float | None, top_k: int | None) -> None:
    if temperature is not None and not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidArgument(f"`temperature` must be in [0, {MAX_TEMPERATURE:g}]")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InvalidArgument("`topP` must be in (0, 1]")
    if top_k is not None and top_k < 0:
        raise InvalidArgument("`topK` must be >= 0")


def _number(changes: Mapping[str, object], key: str, current: float | None) -> float | None:
    """The patched value of a numeric field, or its current one; InvalidArgument if not a number."""
    value = changes.get(key, current)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument(f"`{_FIELD[key]}` must be a number")
    if key == "top_k" and value != int(value):
        raise InvalidArgument("`topK` must be an integer")
    return value


# -- ids and page tokens -------------------------------------------------------------------------


def _slug(text: str) -> str:
    """A tunedModelId stem from a display name: lowercase words joined by '-', letter first."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    slug = slug.lstrip("0123456789-")
    return slug[: 40 - SUFFIX_LEN - 1].rstrip("-")


def _random_token(length: int) -> str:
    return secrets.choice(string.ascii_lowercase) + "".join(
        secrets.choice(_ALPHABET) for _ in range(length - 1)
    )


def _encode_page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode().rstrip("=")


def _decode_page_token(token: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        prefix, _, number = raw.partition(":")
        offset = int(number)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument("`pageToken` is not valid; pass a nextPageToken as is") from None
    if prefix != "offset" or offset < 0:
        raise InvalidArgument("`pageToken` is not valid; pass a nextPageToken as is")
    return offset
