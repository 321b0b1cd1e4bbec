"""API keys in the database, stored only as hashes (the plain key is never written)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import delete, select

from tunery.store.db import Database
from tunery.store.tables import ApiKeyRow


def hash_key(key: str) -> str:
    """The owner id of an API key: its SHA-256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeyRepository:
    """Keys added at runtime (besides TUNERY_API_KEYS); looked up by hash."""

    def __init__(self, db: Database, clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self._db = db
        self._clock = clock

    def add(self, key: str, label: str = "") -> str:
        """Store `key`'s hash (idempotent) and return it."""
        digest = hash_key(key)
        with self._db.session() as session:
            if session.get(ApiKeyRow, digest) is None:
                session.add(ApiKeyRow(key_hash=digest, label=label, create_time=self._clock()))
        return digest

    def contains(self, key: str) -> bool:
        with self._db.read() as session:
            return session.get(ApiKeyRow, hash_key(key)) is not None

    def hashes(self) -> list[str]:
        with self._db.read() as session:
            return list(session.scalars(select(ApiKeyRow.key_hash).order_by(ApiKeyRow.create_time)))

    def remove(self, key: str) -> bool:
        with self._db.session() as session:
            result = session.execute(delete(ApiKeyRow).where(ApiKeyRow.key_hash == hash_key(key)))
            return int(getattr(result, "rowcount", 0)) == 1
