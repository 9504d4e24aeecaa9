"""Bring a database to the newest schema with alembic (called by serve, worker and admin CLI)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from malerei.serve.db.session import Database

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


# pg_advisory_xact_lock key of the migrations: any constant that other applications do not use
_PG_MIGRATION_LOCK = 0x6D616C6572656931  # "malerei1"


def upgrade(db: Database) -> None:
    """Run pending migrations in one write transaction (concurrent starters wait, then see head).

    SQLite serialises the transactions through ``BEGIN IMMEDIATE``; on PostgreSQL (transactional
    DDL) an advisory lock held until commit does the same, so an API server and workers started
    together on an empty database do not both create the tables."""
    from sqlalchemy import text

    config = alembic_config()
    with db.write_engine.begin() as conn:
        if db.is_postgresql:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
