"""Alembic migrations for the Tunery store (run via `tunery.store.db.upgrade`)."""
