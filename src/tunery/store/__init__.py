"""The store: SQLAlchemy persistence for tuned models, jobs, snapshots and API keys.

`Store(settings.database_url)` upgrades the schema, then offers `.models`, `.jobs` and `.keys`:
repositories that return domain dataclasses, never rows.
"""

from __future__ import annotations

from tunery.store.db import Database, upgrade
from tunery.store.jobs import Clock, JobRepository, TrainingInput, utcnow
from tunery.store.keys import ApiKeyRepository, hash_key
from tunery.store.models import ModelRepository


class Store:
    """One database and its repositories; build one per process."""

    def __init__(self, url: str, *, migrate: bool = True, clock: Clock = utcnow) -> None:
        if migrate:
            upgrade(url)
        self.db = Database(url)
        self.clock = clock
        self.models = ModelRepository(self.db)
        self.jobs = JobRepository(self.db, clock)
        self.keys = ApiKeyRepository(self.db, clock)

    def close(self) -> None:
        self.db.dispose()


__all__ = ["Store", "TrainingInput", "hash_key", "Database", "upgrade"]
