"""Initial schema: tuned models, jobs, snapshots, training data, API keys.

Revision ID: 0001_initial
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tunery.store.tables import UTCDateTime

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tuned_models",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("display_name", sa.String(40), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("base_model", sa.String(200), nullable=False),
        sa.Column("owner_key", sa.String(128), nullable=True),
        sa.Column("temperature", sa.Float(), nullable=True),
        sa.Column("top_p", sa.Float(), nullable=True),
        sa.Column("top_k", sa.Integer(), nullable=True),
        sa.Column("epoch_count", sa.Integer(), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("learning_rate", sa.Float(), nullable=True),
        sa.Column("learning_rate_multiplier", sa.Float(), nullable=True),
        sa.Column("create_time", UTCDateTime(), nullable=False),
        sa.Column("update_time", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_tuned_models_owner_key", "tuned_models", ["owner_key"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "tuned_model_id",
            sa.String(40),
            sa.ForeignKey("tuned_models.id", ondelete="CASCADE"),
            nullable=False,
            unique=True,
        ),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("total_steps", sa.Integer(), nullable=False),
        sa.Column("completed_steps", sa.Integer(), nullable=False),
        sa.Column("create_time", UTCDateTime(), nullable=False),
        sa.Column("start_time", UTCDateTime(), nullable=True),
        sa.Column("complete_time", UTCDateTime(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("worker_id", sa.String(200), nullable=True),
        sa.Column("lease_expires", UTCDateTime(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_jobs_state_create_time", "jobs", ["state", "create_time"])
    op.create_table(
        "snapshots",
        sa.Column(
            "job_id",
            sa.String(40),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("step", sa.Integer(), primary_key=True),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("mean_loss", sa.Float(), nullable=False),
        sa.Column("compute_time", UTCDateTime(), nullable=False),
        sa.Column("validation_loss", sa.Float(), nullable=True),
    )
    op.create_table(
        "training_data",
        sa.Column(
            "job_id",
            sa.String(40),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("examples", sa.JSON(), nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("key_hash", sa.String(128), primary_key=True),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("create_time", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_table("training_data")
    op.drop_table("snapshots")
    op.drop_index("ix_jobs_state_create_time", table_name="jobs")
    op.drop_table("jobs")
    op.drop_index("ix_tuned_models_owner_key", table_name="tuned_models")
    op.drop_table("tuned_models")
