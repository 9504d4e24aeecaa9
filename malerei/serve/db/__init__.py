"""Database: SQLAlchemy 2 tables, sessions and alembic migrations."""
