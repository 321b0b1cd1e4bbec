"""Alembic environment: runs on the connection `tunery.store.db.upgrade` hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from tunery.store.tables import Base


def run_migrations_online() -> None:
    connection: Connection | None = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations through tunery.store.db.upgrade(url)")
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,  # SQLite can only ALTER via table copies
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
