"""The SQLAlchemy tables (typed `Mapped[]` only); Alembic revisions create the schema."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    ColumnElement,
    DateTime,
    ForeignKey,
    Index,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC (so SQLite compares them as text correctly), read back UTC-aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class TunedModelRow(Base):
    __tablename__ = "tuned_models"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(40), default="")
    description: Mapped[str] = mapped_column(Text, default="")
    base_model: Mapped[str] = mapped_column(String(200))
    owner_key: Mapped[str | None] = mapped_column(String(128), index=True)
    temperature: Mapped[float | None]
    top_p: Mapped[float | None]
    top_k: Mapped[int | None]
    epoch_count: Mapped[int]
    batch_size: Mapped[int]
    learning_rate: Mapped[float | None]
    learning_rate_multiplier: Mapped[float | None]
    create_time: Mapped[datetime] = mapped_column(UTCDateTime())
    update_time: Mapped[datetime] = mapped_column(UTCDateTime())

    @classmethod
    def owned_by(cls, owner: str | None) -> ColumnElement[bool]:
        """Rows of `owner`; None (open access) matches only models created without a key."""
        return cls.owner_key.is_(None) if owner is None else cls.owner_key == owner


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_create_time", "state", "create_time"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tuned_model_id: Mapped[str] = mapped_column(
        ForeignKey("tuned_models.id", ondelete="CASCADE"), unique=True
    )
    state: Mapped[str] = mapped_column(String(16))
    total_steps: Mapped[int]
    completed_steps: Mapped[int] = mapped_column(default=0)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime())
    start_time: Mapped[datetime | None] = mapped_column(UTCDateTime())
    complete_time: Mapped[datetime | None] = mapped_column(UTCDateTime())
    error: Mapped[str | None] = mapped_column(Text)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    lease_expires: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    # Claims that did not end in a graceful hand-back: 1 while the first worker trains it.
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")


class SnapshotRow(Base):
    __tablename__ = "snapshots"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(primary_key=True)
    epoch: Mapped[int]
    mean_loss: Mapped[float]
    compute_time: Mapped[datetime] = mapped_column(UTCDateTime())
    validation_loss: Mapped[float | None]


class TrainingDataRow(Base):
    """A job's examples as a JSON list of [text_input, output] pairs, kept for resumes."""

    __tablename__ = "training_data"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    examples: Mapped[list[list[str]]] = mapped_column(JSON)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    key_hash: Mapped[str] = mapped_column(String(128), primary_key=True)
    label: Mapped[str] = mapped_column(String(200), default="")
    create_time: Mapped[datetime] = mapped_column(UTCDateTime())
