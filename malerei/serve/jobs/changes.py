"""Wake-ups for event streams when a job changes.

An event stream (``GET /v1/jobs/{id}/events``) reads its job from the database. Polling it
often costs every open stream a query many times a second, and polling rarely delays the
``done`` event: clients resubmit late, and under load the worker's next batch starts without
them. So streams sleep on :class:`JobChanges` and read when woken:

- the in-process worker calls :meth:`JobChanges.changed` after every write;
- on PostgreSQL every write that changes a job also sends ``NOTIFY malerei_jobs`` with the job
  ids (:func:`announce`, delivered when its transaction commits), and each API server's
  :class:`PostgresChangeFeed` listens and wakes its streams. Workers in other processes (the
  ``malerei worker`` command, Redis-queue workers) are heard at once this way.

SQLite has no such signal between processes; there a stream polls (see the events route).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable, Sequence

from sqlalchemy import text
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

CHANNEL = "malerei_jobs"
_PAYLOAD_LIMIT = 7000  # PostgreSQL refuses NOTIFY payloads of 8000 bytes and more


class JobChanges:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event, str | None]] = set()

    def changed(self, job_ids: Iterable[str] | None = None) -> None:
        """These jobs changed (``None``: maybe any job); called from any thread."""
        ids = None if job_ids is None else set(job_ids)
        with self._lock:
            waiters = list(self._waiters)
        for loop, event, job_id in waiters:
            if ids is not None and job_id is not None and job_id not in ids:
                continue
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # its loop has closed: the stream is gone
                pass

    def listen(self, job_id: str | None = None) -> Listener:
        """A subscription to changes of ``job_id`` (``None``: of any job)."""
        return Listener(self, job_id)


class Listener:
    """One stream's subscription (a context manager inside the stream's coroutine)."""

    def __init__(self, changes: JobChanges, job_id: str | None = None) -> None:
        self._changes = changes
        self._event = asyncio.Event()
        self._key = (asyncio.get_running_loop(), self._event, job_id)

    def __enter__(self) -> Listener:
        with self._changes._lock:
            self._changes._waiters.add(self._key)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._changes._lock:
            self._changes._waiters.discard(self._key)

    async def wait(self, timeout: float) -> bool:
        """Until a change (True) or ``timeout`` seconds (False); a change since the last wait counts."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            self._event.clear()
        return True


def announce(session: Session, job_ids: Sequence[str]) -> None:
    """On PostgreSQL: tell every API server's streams that these jobs changed, when ``session``'s
    transaction commits (a rolled-back change is never announced). Nothing on other databases."""
    if not job_ids or session.get_bind().dialect.name != "postgresql":
        return
    chunks: list[list[str]] = [[]]
    size = 0
    for job_id in job_ids:
        if size + len(job_id) + 1 > _PAYLOAD_LIMIT:
            chunks.append([])
            size = 0
        chunks[-1].append(job_id)
        size += len(job_id) + 1
    for chunk in chunks:
        session.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": ",".join(chunk)})


class PostgresChangeFeed:
    """A thread that LISTENs on PostgreSQL for :func:`announce` and wakes this process's streams.

    It holds one connection of its own (outside the pool). When the connection breaks it wakes
    every stream (they read and fall back to their poll) and reconnects with a growing pause."""

    def __init__(self, sqlalchemy_url: str, changes: JobChanges, *, timeout_s: float = 0.5) -> None:
        from sqlalchemy.engine import make_url

        # psycopg wants a libpq URI: the same URL without SQLAlchemy's "+driver"
        self._conninfo = make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)
        self._changes = changes
        self._timeout_s = timeout_s
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="malerei-pg-changes", daemon=True)

    def start(self, *, wait_s: float = 10.0) -> PostgresChangeFeed:
        """Start listening; returns once LISTEN is in place (or ``wait_s`` passed: it keeps trying)."""
        self._thread.start()
        if not self._listening.wait(wait_s):
            log.warning("job change feed: not listening on PostgreSQL yet; event streams poll meanwhile")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5 * self._timeout_s + 5)

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    def _run(self) -> None:
        import psycopg

        pause = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    pause = 0.5
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=self._timeout_s):
                            self._changes.changed(note.payload.split(",") if note.payload else None)
            except psycopg.Error as exc:
                # the URL may hold a password: say what failed, never the conninfo
                log.warning("job change feed: PostgreSQL connection lost (%s); retrying in %.1f s",
                            type(exc).__name__, pause)
            finally:
                self._listening.clear()
            self._changes.changed()  # notifications may have been missed: every stream reads again
            self._stop.wait(pause)
            pause = min(pause * 2, 10.0)
