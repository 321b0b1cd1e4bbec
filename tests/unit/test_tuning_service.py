"""TuningService rules: validation messages, ids, owners, paging, patch, cancel and delete."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tunery.domain import JobState, ModelState
from tunery.engine.base_models import BaseModelRegistry
from tunery.engine.specs import DEFAULT_BATCH_SIZE, DEFAULT_EPOCH_COUNT, Example
from tunery.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from tunery.service.tuning import CreateRequest, TuningService
from tunery.store import Store

BASE = "models/gemma-3-270m"
EXAMPLES = tuple(Example(f"in {i}", f"out {i}") for i in range(10))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path / 'tunery.db'}")
    yield store
    store.close()


@pytest.fixture
def svc(store: Store, tmp_path: Path) -> TuningService:
    registry = BaseModelRegistry(tmp_path / "base_models")
    return TuningService(store, registry, tmp_path / "tuned_models")


def request(**overrides: Any) -> CreateRequest:
    return replace(CreateRequest(base_model=BASE, examples=EXAMPLES), **overrides)


# -- create ------------------------------------------------------------------------------------


def test_create_queues_a_job_with_default_hyperparameters(svc: TuningService) -> None:
    model = svc.create(request(display_name="Pirate"), owner=None)

    assert model.state is ModelState.CREATING
    assert model.base_model == BASE
    assert model.hyperparameters.epoch_count == DEFAULT_EPOCH_COUNT
    assert model.hyperparameters.batch_size == DEFAULT_BATCH_SIZE
    assert model.hyperparameters.learning_rate == 0.001
    assert model.job is not None and model.job.state is JobState.QUEUED
    assert model.job.total_steps == math.ceil(10 / DEFAULT_BATCH_SIZE) * DEFAULT_EPOCH_COUNT


def test_create_accepts_the_base_model_without_the_models_prefix(svc: TuningService) -> None:
    model = svc.create(request(base_model="gemma-3-270m"), owner=None)
    assert model.base_model == BASE


def test_create_defaults_to_greedy_and_the_base_models_top_p(svc: TuningService) -> None:
    base = svc.registry.get(BASE)
    model = svc.create(request(top_k=7), owner=None)
    assert (model.temperature, model.top_p, model.top_k) == (0.0, base.top_p, 7)
    assert svc.create(request(temperature=0.7), owner=None).temperature == 0.7


def test_create_keeps_a_learning_rate_multiplier_as_given(svc: TuningService) -> None:
    model = svc.create(request(learning_rate_multiplier=2.0), owner=None)
    assert model.hyperparameters.learning_rate_multiplier == 2.0
    assert model.hyperparameters.learning_rate is None


def test_create_with_an_unknown_base_model_is_not_found(svc: TuningService) -> None:
    with pytest.raises(NotFound, match="models/nope"):
        svc.create(request(base_model="models/nope"), owner=None)


def test_create_without_examples_is_invalid(svc: TuningService) -> None:
    with pytest.raises(InvalidArgument, match="no examples"):
        svc.create(request(examples=()), owner=None)


def test_create_names_the_example_whose_output_is_too_long(svc: TuningService) -> None:
    examples = EXAMPLES + (Example("ok", "x" * 5_231),) + EXAMPLES
    with pytest.raises(InvalidArgument) as error:
        svc.create(request(examples=examples), owner=None)
    assert error.value.message == (
        "1 of 21 examples are invalid: example 11: output has 5,231 characters; the limit is 5,000"
    )


def test_create_reports_every_bad_example_in_one_message(svc: TuningService) -> None:
    examples = (Example("ok", "ok"), Example("", "out"), Example("x" * 40_001, " "))
    with pytest.raises(InvalidArgument) as error:
        svc.create(request(examples=examples), owner=None)
    assert error.value.message == (
        "2 of 3 examples are invalid: "
        "example 2: textInput is empty; "
        "example 3: textInput has 40,001 characters; the limit is 40,000; output is empty"
    )


def test_create_lists_the_first_ten_bad_examples_and_counts_the_rest(svc: TuningService) -> None:
    examples = tuple(Example("in", "") for _ in range(25))
    with pytest.raises(InvalidArgument) as error:
        svc.create(request(examples=examples), owner=None)
    message = error.value.message
    assert "example 10: output is empty" in message
    assert "example 11:" not in message
    assert message.startswith("25 of 25 examples are invalid: example 1: output is empty")
    assert message.endswith("and 15 more")


def test_create_uses_a_valid_tuned_model_id(svc: TuningService) -> None:
    model = svc.create(request(tuned_model_id="my-model-1"), owner=None)
    assert model.name == "tunedModels/my-model-1"


@pytest.mark.parametrize("bad_id", ["1abc", "Abc", "abc-", "a_b", "a" * 41, ""])
def test_create_rejects_a_malformed_tuned_model_id(svc: TuningService, bad_id: str) -> None:
    with pytest.raises(InvalidArgument, match="tunedModelId"):
        svc.create(request(tuned_model_id=bad_id), owner=None)


def test_create_with_a_taken_tuned_model_id_is_already_exists(svc: TuningService) -> None:
    svc.create(request(tuned_model_id="taken"), owner=None)
    with pytest.raises(AlreadyExists, match="tunedModels/taken"):
        svc.create(request(tuned_model_id="taken"), owner="someone-else")


def test_create_derives_the_id_from_the_display_name_plus_a_suffix(svc: TuningService) -> None:
    model = svc.create(request(display_name="Number Generator: v2!"), owner=None)
    assert re.fullmatch(r"number-generator-v2-[a-z][a-z0-9]{5}", model.id)


def test_create_without_a_display_name_gets_a_random_valid_id(svc: TuningService) -> None:
    first = svc.create(request(), owner=None)
    second = svc.create(request(display_name="42 !!"), owner=None)
    for model in (first, second):
        assert re.fullmatch(r"[a-z]([a-z0-9-]{0,38}[a-z0-9])?", model.id)
    assert first.id != second.id


def test_create_rejects_a_display_name_over_40_characters(svc: TuningService) -> None:
    with pytest.raises(InvalidArgument, match="`displayName` has 41 characters; the limit is 40"):
        svc.create(request(display_name="x" * 41), owner=None)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.1, "`temperature` must be in"),
        ("temperature", 2.5, "`temperature` must be in"),
        ("top_p", 0.0, "`topP` must be in"),
        ("top_k", -1, "`topK` must be >= 0"),
        ("epoch_count", 0, "`epochCount` must be >= 1"),
        ("batch_size", 0, "`batchSize` must be >= 1"),
        ("learning_rate", -1.0, "`learningRate` must be > 0"),
    ],
)
def test_create_rejects_out_of_range_settings(
    svc: TuningService, field: str, value: float, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        svc.create(request(**{field: value}), owner=None)


def test_create_over_the_owners_job_limit_is_resource_exhausted(
    store: Store, tmp_path: Path
) -> None:
    registry = BaseModelRegistry(tmp_path / "base_models")
    svc = TuningService(store, registry, tmp_path / "t", max_unfinished_jobs_per_owner=1)
    first = svc.create(request(), owner="k1")
    with pytest.raises(ResourceExhausted):
        svc.create(request(), owner="k1")
    svc.cancel(first.id, owner="k1")
    svc.create(request(), owner="k1")  # a cancelled job no longer counts


# -- read --------------------------------------------------------------------------------------


def test_get_accepts_the_bare_id_or_the_resource_name(svc: TuningService) -> None:
    model = svc.create(request(tuned_model_id="m"), owner=None)
    assert svc.get("m", None) == model
    assert svc.get("tunedModels/m", None) == model


def test_another_owners_model_is_not_found(svc: TuningService) -> None:
    svc.create(request(tuned_model_id="m"), owner="k1")
    for owner in ("k2", None):
        with pytest.raises(NotFound, match="tunedModels/m is not found"):
            svc.get("m", owner)
        with pytest.raises(NotFound):
            svc.delete("m", owner)
    assert [m.id for m in svc.list("k2", None, None)[0]] == []


def test_list_pages_with_tokens_and_never_returns_an_empty_page_with_a_token(
    svc: TuningService,
) -> None:
    for i in range(20):
        svc.create(request(tuned_model_id=f"m{i:02d}"), owner=None)

    first, token = svc.list(None, 10, None)
    assert len(first) == 10 and token
    second, token2 = svc.list(None, 10, token)
    assert len(second) == 10 and token2 is None  # exactly 20: the last page has no token
    assert {m.id for m in first} | {m.id for m in second} == {f"m{i:02d}" for i in range(20)}


def test_list_defaults_to_ten_per_page_and_caps_at_1000(svc: TuningService) -> None:
    for i in range(11):
        svc.create(request(tuned_model_id=f"m{i:02d}"), owner=None)
    assert len(svc.list(None, None, None)[0]) == 10
    assert len(svc.list(None, 0, None)[0]) == 10
    assert len(svc.list(None, 5000, None)[0]) == 11


def test_list_filters_by_display_name_or_description(svc: TuningService) -> None:
    svc.create(request(tuned_model_id="a", display_name="Pirate"), owner=None)
    svc.create(request(tuned_model_id="b", description="a pirate model"), owner=None)
    svc.create(request(tuned_model_id="c", display_name="Poet"), owner=None)
    models, token = svc.list(None, 10, None, filter="PIRATE")
    assert {m.id for m in models} == {"a", "b"} and token is None


@pytest.mark.parametrize("token", ["garbage!", "b2Zmc2V0Oi0x", "eDox"])
def test_list_rejects_a_page_token_it_did_not_issue(svc: TuningService, token: str) -> None:
    with pytest.raises(InvalidArgument, match="pageToken"):
        svc.list(None, 10, token)


def test_list_jobs_shows_the_owners_jobs(svc: TuningService) -> None:
    svc.create(request(tuned_model_id="a"), owner="k1")
    svc.create(request(tuned_model_id="b"), owner="k2")
    assert [j.tuned_model_id for j in svc.list_jobs("k1")] == ["a"]


# -- change ------------------------------------------------------------------------------------


def test_patch_updates_only_the_fields_given(svc: TuningService) -> None:
    svc.create(request(tuned_model_id="m", display_name="old", description="keep"), owner=None)

    patched = svc.patch("m", None, {"display_name": "new", "temperature": 0.2, "top_k": 3})

    assert (patched.display_name, patched.description) == ("new", "keep")
    assert (patched.temperature, patched.top_k) == (0.2, 3)
    assert patched.update_time >= patched.create_time


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"base_model": "x"}, "cannot update base_model"),
        ({"display_name": "x" * 41}, "`displayName` has 41 characters"),
        ({"display_name": 3}, "`displayName` must be a string"),
        ({"temperature": 3.0}, "`temperature` must be in"),
        ({"top_p": "high"}, "`topP` must be a number"),
        ({"top_k": 1.5}, "`topK` must be an integer"),
    ],
)
def test_patch_rejects_invalid_changes(
    svc: TuningService, changes: dict[str, object], message: str
) -> None:
    svc.create(request(tuned_model_id="m"), owner=None)
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        svc.patch("m", None, changes)


def test_cancel_of_a_queued_job_cancels_it_and_fails_the_model(svc: TuningService) -> None:
    svc.create(request(tuned_model_id="m"), owner=None)

    model = svc.cancel("m", None)

    assert model.job is not None and model.job.state is JobState.CANCELLED
    assert model.state is ModelState.FAILED
    assert svc.cancel("m", None).job == model.job  # cancelling again changes nothing


def test_cancel_of_a_running_job_asks_its_worker_to_stop(svc: TuningService, store: Store) -> None:
    svc.create(request(tuned_model_id="m"), owner=None)
    store.jobs.claim_next("w1", 30)

    model = svc.cancel("m", None)

    assert model.job is not None
    assert model.job.state is JobState.RUNNING and model.job.cancel_requested


def test_cancel_of_a_finished_job_is_a_failed_precondition(
    svc: TuningService, store: Store
) -> None:
    model = svc.create(request(tuned_model_id="m"), owner=None)
    assert model.job is not None
    store.jobs.claim_next("w1", 30)
    store.jobs.finish(model.job.id)
    with pytest.raises(FailedPrecondition, match="already finished"):
        svc.cancel("m", None)


def test_delete_removes_the_rows_and_the_adapter_folder(svc: TuningService) -> None:
    svc.create(request(tuned_model_id="m"), owner=None)
    adapter = svc.adapter_dir("m")
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"x")

    svc.delete("m", None)

    assert not svc.work_dir("m").exists()
    with pytest.raises(NotFound):
        svc.get("m", None)
    assert svc.list_jobs(None) == []


def test_adapter_dir_is_inside_the_models_work_dir(svc: TuningService, tmp_path: Path) -> None:
    assert svc.work_dir("m") == tmp_path / "tuned_models" / "m"
    assert svc.adapter_dir("m").parent == svc.work_dir("m")
