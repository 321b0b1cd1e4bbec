"""Tuned models in the database: create (with their job and examples), read, page, patch, delete."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, exists, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tunery.domain import Hyperparameters, JobState, ModelState, TunedModel, TuningJob
from tunery.engine.specs import Example
from tunery.errors import AlreadyExists
from tunery.store.db import Database
from tunery.store.jobs import job_from_row, snapshot_from_row
from tunery.store.tables import JobRow, SnapshotRow, TrainingDataRow, TunedModelRow

PATCHABLE = frozenset({"display_name", "description", "temperature", "top_p", "top_k"})


class ModelRepository:
    """Tuned-model rows in and domain `TunedModel`s (with job and snapshots) out."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, model: TunedModel, job: TuningJob, examples: Sequence[Example]) -> TunedModel:
        """Insert the model, its queued job and its training data in one transaction."""
        try:
            with self._db.session() as session:
                if session.get(TunedModelRow, model.id) is not None:
                    raise AlreadyExists(f"tuned model `{model.name}` already exists")
                session.add(_row_from_model(model))
                session.flush()  # the job's foreign key needs the model row first
                session.add(_row_from_job(job))
                session.flush()
                session.add(
                    TrainingDataRow(
                        job_id=job.id, examples=[[e.text_input, e.output] for e in examples]
                    )
                )
        except IntegrityError as e:  # lost a race for the same id
            raise AlreadyExists(f"tuned model `{model.name}` already exists") from e
        found = self.get(model.id)
        assert found is not None
        return found

    def get(self, model_id: str, snapshots: bool = True) -> TunedModel | None:
        """The model with its job; with its training snapshots unless `snapshots` is False
        (serving needs none: a long job has thousands, read on every request otherwise)."""
        with self._db.read() as session:
            row = session.get(TunedModelRow, model_id)
            return _load(session, [row], snapshots)[0] if row else None

    def exists(self, model_id: str) -> bool:
        with self._db.read() as session:
            return bool(session.scalar(select(exists().where(TunedModelRow.id == model_id))))

    def list(
        self, owner: str | None, offset: int, limit: int, text_filter: str = ""
    ) -> list[TunedModel]:
        """The owner's models, newest first; `text_filter` matches display name or description."""
        query = select(TunedModelRow).where(TunedModelRow.owned_by(owner))
        if text_filter:
            needle = text_filter.lower()
            query = query.where(
                or_(
                    func.lower(TunedModelRow.display_name).contains(needle, autoescape=True),
                    func.lower(TunedModelRow.description).contains(needle, autoescape=True),
                )
            )
        query = query.order_by(TunedModelRow.create_time.desc(), TunedModelRow.id)
        with self._db.read() as session:
            rows = list(session.scalars(query.offset(offset).limit(limit)))
            return _load(session, rows)

    def count_unfinished_jobs(self, owner: str) -> int:
        """How many of the owner's jobs are queued or running."""
        with self._db.read() as session:
            count = session.scalar(
                select(func.count(JobRow.id))
                .join(TunedModelRow, JobRow.tuned_model_id == TunedModelRow.id)
                .where(
                    TunedModelRow.owned_by(owner),
                    JobRow.state.in_([JobState.QUEUED.value, JobState.RUNNING.value]),
                )
            )
            return int(count or 0)

    def update(
        self, model_id: str, changes: Mapping[str, Any], update_time: datetime
    ) -> TunedModel | None:
        """Apply `changes` (keys from PATCHABLE) and set update_time; None if the model is gone."""
        unknown = set(changes) - PATCHABLE
        if unknown:
            raise ValueError(f"not patchable: {sorted(unknown)}")
        with self._db.session() as session:
            row = session.get(TunedModelRow, model_id)
            if row is None:
                return None
            for key, value in changes.items():
                setattr(row, key, value)
            row.update_time = update_time
        return self.get(model_id)

    def delete(self, model_id: str) -> bool:
        """Delete the model with its job, snapshots and training data."""
        with self._db.session() as session:
            # Explicit deletes, so this does not depend on SQLite's foreign_keys pragma.
            job_ids = select(JobRow.id).where(JobRow.tuned_model_id == model_id)
            session.execute(delete(SnapshotRow).where(SnapshotRow.job_id.in_(job_ids)))
            session.execute(delete(TrainingDataRow).where(TrainingDataRow.job_id.in_(job_ids)))
            session.execute(delete(JobRow).where(JobRow.tuned_model_id == model_id))
            result = session.execute(delete(TunedModelRow).where(TunedModelRow.id == model_id))
            return int(getattr(result, "rowcount", 0)) == 1


def _load(
    session: Session, rows: Sequence[TunedModelRow], snapshots: bool = True
) -> list[TunedModel]:
    """Domain models for `rows`, fetching their jobs and (`snapshots`) snapshots in two
    queries."""
    ids = [r.id for r in rows]
    jobs = {
        j.tuned_model_id: job_from_row(j)
        for j in session.scalars(select(JobRow).where(JobRow.tuned_model_id.in_(ids)))
    }
    job_ids = [j.id for j in jobs.values()]
    snaps: dict[str, list[SnapshotRow]] = {}
    query = select(SnapshotRow).where(SnapshotRow.job_id.in_(job_ids)).order_by(SnapshotRow.step)
    for s in session.scalars(query) if snapshots else ():
        snaps.setdefault(s.job_id, []).append(s)
    out = []
    for row in rows:
        job = jobs.get(row.id)
        out.append(
            TunedModel(
                id=row.id,
                display_name=row.display_name,
                description=row.description,
                base_model=row.base_model,
                state=job.state.model_state if job else ModelState.ACTIVE,
                create_time=row.create_time,
                update_time=row.update_time,
                hyperparameters=Hyperparameters(
                    epoch_count=row.epoch_count,
                    batch_size=row.batch_size,
                    learning_rate=row.learning_rate,
                    learning_rate_multiplier=row.learning_rate_multiplier,
                ),
                temperature=row.temperature,
                top_p=row.top_p,
                top_k=row.top_k,
                owner_key=row.owner_key,
                job=job,
                snapshots=tuple(snapshot_from_row(s) for s in snaps.get(job.id, [])) if job else (),
            )
        )
    return out


def _row_from_model(model: TunedModel) -> TunedModelRow:
    hp = model.hyperparameters
    return TunedModelRow(
        id=model.id,
        display_name=model.display_name,
        description=model.description,
        base_model=model.base_model,
        owner_key=model.owner_key,
        temperature=model.temperature,
        top_p=model.top_p,
        top_k=model.top_k,
        epoch_count=hp.epoch_count,
        batch_size=hp.batch_size,
        learning_rate=hp.learning_rate,
        learning_rate_multiplier=hp.learning_rate_multiplier,
        create_time=model.create_time,
        update_time=model.update_time,
    )


def _row_from_job(job: TuningJob) -> JobRow:
    return JobRow(
        id=job.id,
        tuned_model_id=job.tuned_model_id,
        state=job.state.value,
        total_steps=job.total_steps,
        completed_steps=job.completed_steps,
        create_time=job.create_time,
        start_time=job.start_time,
        complete_time=job.complete_time,
        error=job.error,
        worker_id=job.worker_id,
        lease_expires=job.lease_expires,
        cancel_requested=job.cancel_requested,
        attempts=job.attempts,
    )
