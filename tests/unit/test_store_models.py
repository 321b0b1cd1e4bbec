"""Tuned models in a real SQLite store: domain objects in and out, paging, filters, deletes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tunery.domain import Hyperparameters, JobState, ModelState, Snapshot, TunedModel, TuningJob
from tunery.engine.specs import Example
from tunery.errors import AlreadyExists
from tunery.store import Store

T0 = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path / 'tunery.db'}")
    yield store
    store.close()


def add(
    store: Store,
    model_id: str,
    *,
    minute: int = 0,
    display_name: str = "",
    description: str = "",
    owner: str | None = None,
) -> TunedModel:
    created = T0 + timedelta(minutes=minute)
    model = TunedModel(
        id=model_id,
        display_name=display_name,
        description=description,
        base_model="models/gemma-3-270m",
        state=ModelState.CREATING,
        create_time=created,
        update_time=created,
        hyperparameters=Hyperparameters(epoch_count=3, batch_size=4, learning_rate=0.002),
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        owner_key=owner,
    )
    job = TuningJob(
        id=f"op-{model_id}",
        tuned_model_id=model_id,
        state=JobState.QUEUED,
        total_steps=6,
        completed_steps=0,
        create_time=created,
    )
    return store.models.create(model, job, [Example("a", "b"), Example("c", "d")])


def test_create_then_get_returns_the_same_domain_model_with_its_job(store: Store) -> None:
    created = add(store, "m", display_name="My model", description="desc", owner="k1")

    got = store.models.get("m")

    assert got == created
    assert got.name == "tunedModels/m"
    assert got.state is ModelState.CREATING
    assert got.create_time == T0 and got.create_time.tzinfo is not None
    assert got.hyperparameters == Hyperparameters(3, 4, learning_rate=0.002)
    assert (got.temperature, got.top_p, got.top_k, got.owner_key) == (0.5, 0.9, 40, "k1")
    assert got.job is not None and got.job.id == "op-m" and got.job.total_steps == 6


def test_get_includes_snapshots_in_step_order(store: Store) -> None:
    add(store, "m")
    for step in (2, 1):
        store.jobs.record_snapshot("op-m", Snapshot(step, 1, 1.0 / step, T0))
    got = store.models.get("m")
    assert got is not None and [s.step for s in got.snapshots] == [1, 2]


def test_create_with_a_taken_id_is_already_exists(store: Store) -> None:
    add(store, "m")
    with pytest.raises(AlreadyExists, match="tunedModels/m"):
        add(store, "m")


def test_get_can_leave_the_snapshots_out_and_changes_nothing_else(store: Store) -> None:
    test_get_includes_snapshots_in_step_order(store)
    full = store.models.get("m")
    lean = store.models.get("m", snapshots=False)
    assert full is not None and lean is not None and full.snapshots
    assert lean.snapshots == () and replace(lean, snapshots=full.snapshots) == full


def test_get_of_an_unknown_id_is_none(store: Store) -> None:
    assert store.models.get("nope") is None
    assert store.models.exists("nope") is False


def test_list_pages_newest_first(store: Store) -> None:
    for i in range(5):
        add(store, f"m{i}", minute=i)
    assert [m.id for m in store.models.list(None, offset=0, limit=2)] == ["m4", "m3"]
    assert [m.id for m in store.models.list(None, offset=4, limit=2)] == ["m0"]


def test_list_filter_matches_display_name_or_description_case_insensitively(
    store: Store,
) -> None:
    add(store, "a", display_name="Pirate Speak")
    add(store, "b", description="talks like a PIRATE")
    add(store, "c", display_name="100% literal")
    add(store, "d", display_name="other")

    assert {m.id for m in store.models.list(None, 0, 10, "pirate")} == {"a", "b"}
    assert {m.id for m in store.models.list(None, 0, 10, "0%")} == {"c"}  # % is not a wildcard


def test_list_shows_only_the_owners_models(store: Store) -> None:
    add(store, "mine", owner="k1")
    add(store, "theirs", owner="k2")
    add(store, "open")
    assert [m.id for m in store.models.list("k1", 0, 10)] == ["mine"]
    assert [m.id for m in store.models.list(None, 0, 10)] == ["open"]


def test_update_changes_only_the_given_fields(store: Store) -> None:
    add(store, "m", display_name="old", description="keep")
    later = T0 + timedelta(hours=1)

    updated = store.models.update("m", {"display_name": "new", "top_k": 5}, later)

    assert updated is not None
    assert (updated.display_name, updated.description, updated.top_k) == ("new", "keep", 5)
    assert updated.update_time == later


def test_delete_removes_the_model_its_job_snapshots_and_examples(store: Store) -> None:
    add(store, "m")
    store.jobs.record_snapshot("op-m", Snapshot(1, 1, 1.0, T0))

    assert store.models.delete("m")

    assert store.models.get("m") is None
    assert store.jobs.get("op-m") is None
    assert store.jobs.snapshots("op-m") == ()
    assert store.jobs.training_input("op-m") is None
    assert store.models.delete("m") is False


def test_count_unfinished_jobs_counts_queued_and_running_only(store: Store) -> None:
    for name in ("a", "b", "c"):
        add(store, name, owner="k1")
    store.jobs.claim_next("w", 30)  # a: running
    store.jobs.request_cancel("op-b")  # b: cancelled
    assert store.models.count_unfinished_jobs("k1") == 2
    assert store.models.count_unfinished_jobs("k2") == 0
