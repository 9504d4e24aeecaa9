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


def upgrade(db: Database) -> None:
    """Run pending migrations in one write transaction (concurrent starters wait, then see head)."""
    config = alembic_config()
    with db.write_engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
