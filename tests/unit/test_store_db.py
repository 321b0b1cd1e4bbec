"""The database handle and its Alembic schema."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import inspect, text

from tunery.store import Store
from tunery.store.db import Database, current_revision, head_revision, upgrade


def test_upgrade_creates_every_table_at_the_newest_revision(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'tunery.db'}"
    assert current_revision(url) is None

    upgrade(url)

    assert current_revision(url) == head_revision() == "0002_job_attempts"
    db = Database(url)
    tables = set(inspect(db.engine).get_table_names())
    db.dispose()
    assert {"tuned_models", "jobs", "snapshots", "training_data", "api_keys"} <= tables


def test_upgrade_twice_is_a_no_op(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tunery.db'}"
    upgrade(url)
    upgrade(url)
    assert current_revision(url) == head_revision()


def test_an_old_data_dir_is_upgraded_to_head_with_its_rows_kept(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tunery.db'}"
    upgrade(url, "0001_initial")
    store = Store(url, migrate=False)
    store.keys.add("k1")
    store.close()

    upgrade(url)

    store = Store(url)
    assert store.keys.contains("k1")
    store.close()


def test_jobs_of_a_data_dir_at_0001_get_zero_attempts_and_keep_resuming(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tunery.db'}"
    upgrade(url, "0001_initial")
    db = Database(url)
    with db.session() as session:
        session.execute(
            text(
                "INSERT INTO tuned_models (id, display_name, description, base_model, epoch_count,"
                " batch_size, create_time, update_time) VALUES ('m', '', '', 'models/x', 1, 1,"
                " '2025-01-01 00:00:00', '2025-01-01 00:00:00')"
            )
        )
        session.execute(
            text(
                "INSERT INTO jobs (id, tuned_model_id, state, total_steps, completed_steps,"
                " create_time, cancel_requested) VALUES ('j', 'm', 'QUEUED', 4, 0,"
                " '2025-01-01 00:00:00', 0)"
            )
        )
    db.dispose()

    store = Store(url)  # upgrades to head on open, as `tunery serve` does
    old = store.jobs.get("j")
    claimed = store.jobs.claim_next("w", 30, max_attempts=3)
    store.close()

    assert current_revision(url) == head_revision()
    assert old is not None and old.attempts == 0
    assert claimed is not None and claimed.id == "j" and claimed.attempts == 1


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'tunery.db'}")
    with db.read() as session:
        assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert (session.execute(text("PRAGMA busy_timeout")).scalar() or 0) >= 1000
    db.dispose()


def test_api_keys_are_stored_only_as_hashes(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'tunery.db'}")
    digest = store.keys.add("secret-key", label="ci")
    assert store.keys.add("secret-key") == digest  # idempotent
    assert store.keys.hashes() == [digest]
    assert "secret-key" not in digest
    assert store.keys.remove("secret-key")
    assert not store.keys.contains("secret-key")
    store.close()
