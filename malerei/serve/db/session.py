"""Engines and sessions.

SQLite (the embedded default) runs in WAL mode with ``synchronous=FULL`` so a committed job or
credit entry survives power loss. Every transaction that writes starts with ``BEGIN IMMEDIATE``:
writers queue on SQLite's lock (``busy_timeout``) instead of failing halfway with
"database is locked" when a read transaction tries to upgrade. Readers use plain ``BEGIN`` and,
thanks to WAL, never wait.

Any other SQLAlchemy URL (PostgreSQL) uses ordinary READ COMMITTED transactions on one pool;
where SQLite's single writer made a check-then-write safe, the code takes a row lock
(``SELECT ... FOR UPDATE``: the user row on submission, the job row on completion) or claims
with ``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def _sqlite_engine(url: str, begin: str) -> Engine:
    engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False}, pool_size=8,
                           max_overflow=16, pool_pre_ping=False)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:  # noqa: ANN001 - DB-API connection
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:  # noqa: ANN001
        conn.exec_driver_sql(begin)

    return engine


class Database:
    """Owns the engines; ``read()`` and ``write()`` give sessions that commit on success."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.is_postgresql = url.startswith("postgresql")
        if self.is_sqlite:
            self.read_engine = _sqlite_engine(url, "BEGIN")
            self.write_engine = _sqlite_engine(url, "BEGIN IMMEDIATE")
        else:
            # as many connections as the SQLite pools; each process (API server, worker) has its
            # own pool, so PostgreSQL's max_connections must cover 40 per process
            self.read_engine = self.write_engine = create_engine(url, pool_pre_ping=True, pool_size=10,
                                                                 max_overflow=30)
        self._read = sessionmaker(self.read_engine, expire_on_commit=False)
        self._write = sessionmaker(self.write_engine, expire_on_commit=False)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as session:  # closing ends the transaction; loaded objects stay readable
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction: committed when the block ends, rolled back on an exception."""
        with self._write() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.read_engine.dispose()
        if self.write_engine is not self.read_engine:
            self.write_engine.dispose()
