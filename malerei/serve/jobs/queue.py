"""The job queue: an interface, and its implementation on the SQL database.

The API only calls :meth:`JobQueue.notify` (after the submission transaction that wrote the job
row has committed) and :meth:`JobQueue.depth`; workers call the rest. Workers hold *leases*: a claimed
job carries ``lease_owner`` and ``lease_expires_at``, which the worker's heartbeat extends. A job
whose lease ran out belongs to a dead worker and is queued again, or failed once it has been
tried ``max_attempts`` times. Results are written only by the lease holder, inside the
transaction that marks the job finished, so each result is stored exactly once.

:class:`SqlJobQueue` runs on SQLite (``BEGIN IMMEDIATE`` serialises claims) and PostgreSQL
(``FOR UPDATE SKIP LOCKED`` claims, row locks on completion). ``redis_queue.RedisJobQueue``
implements the same methods with the queue, leases and wake-ups in Redis; the job rows, the
results and the decision who holds a job (``lease_owner``, checked under a row lock when a
result is written) stay in the database with either.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from malerei.serve import credits
from malerei.serve.db.models import Image, Job
from malerei.serve.jobs.changes import announce
from malerei.serve.db.session import Database

ACTIVE = ("queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")


@dataclass(kw_only=True)
class StoredImage:
    """One result, ready to be written: PNG bytes and what the gallery shows about it."""

    id: str
    index: int
    png: bytes
    width: int
    height: int
    seed: int
    infotext: str
    recipe: dict


class JobQueue(Protocol):
    def notify(self, job: Job | None = None) -> None: ...
    def wait(self, timeout: float) -> None: ...
    def depth(self) -> int: ...
    def claim(self, worker_id: str, *, max_jobs: int, lease_s: float, window_s: float,
              since: float = 0.0) -> list[Job]: ...
    def extend(self, worker_id: str, job_ids: Sequence[str], lease_s: float) -> set[str]: ...
    def cancel_requested(self, job_ids: Sequence[str]) -> set[str]: ...
    def report_progress(self, worker_id: str, job_ids: Sequence[str], step: int, total: int,
                        preview_png: bytes | None) -> None: ...
    def complete(self, worker_id: str, job_id: str, images: Sequence[StoredImage],
                 write_file: Callable[[str, bytes], None], path_for: Callable[[str, int], str]) -> bool: ...
    def fail(self, worker_id: str, job_id: str, code: str, message: str) -> bool: ...
    def cancel_running(self, worker_id: str, job_id: str) -> bool: ...
    def release(self, worker_id: str, job_id: str) -> bool: ...


def finish(session: Session, job: Job, status: str, *, code: str | None = None, message: str | None = None) -> None:
    """Move ``job`` to a terminal state; refund unless it succeeded; schedule its webhook."""
    now = time.time()
    announce(session, [job.id])
    job.status = status
    job.finished_at = now
    job.lease_owner = None
    job.lease_expires_at = None
    job.error_code = code
    job.error_message = message
    if status != "succeeded":
        credits.refund(session, job.user_id, job.id, note=f"job {status}")
    if job.webhook_url:
        job.webhook_status = "pending"
        job.webhook_next_at = now


def settle_dead(session: Session, job: Job, *, max_attempts: int) -> None:
    """``job``'s worker died (its lease ran out): queue it again, or cancel it when the user asked
    for that, or fail it for good after ``max_attempts`` tries."""
    if job.cancel_requested:
        finish(session, job, "cancelled", code="cancelled", message="cancelled by the user")
    elif job.attempts >= max_attempts:
        finish(session, job, "failed", code="worker_died",
               message=f"the worker running this job died {job.attempts} times "
                       f"(limit {max_attempts}); the job was not retried again")
    else:
        job.status = "queued"
        job.lease_owner = None
        job.lease_expires_at = None
        job.progress_step = 0
        announce(session, [job.id])


COMPANY_WAIT_WINDOWS = 4


def wait_for_company(count: Callable[[], int], *, oldest: float, since: float, window_s: float, max_jobs: int) -> None:
    """Before a claim: while fewer than ``max_jobs`` compatible jobs are queued, wait until
    ``window_s`` after the later of the oldest one's submission and ``since`` (when the claiming
    worker finished its last batch). Measuring from ``since`` too is what keeps batches whole
    under steady load: the clients of the batch just finished submit again a few tens of
    milliseconds later, while the other clients' jobs are already old, and without it the
    worker would take those alone and the two groups would alternate in half-size batches.
    While company keeps arriving (each new job less than ``window_s`` after the last) the wait
    goes on, up to ``COMPANY_WAIT_WINDOWS`` windows in all: eight clients' resubmissions, each a
    database write, can take longer than one window on a busy machine."""
    if window_s <= 0 or max_jobs <= 1:
        return
    start = max(oldest, since)
    deadline, cap = start + window_s, start + COMPANY_WAIT_WINDOWS * window_s
    queued = count()
    while time.time() < deadline and queued < max_jobs:
        time.sleep(min(0.01, max(deadline - time.time(), 0.0)))
        if (now_queued := count()) > queued:
            queued = now_queued
            deadline = min(max(deadline, time.time() + window_s), cap)


def mark_running(session: Session, job_ids: Sequence[str], worker_id: str, lease_expires_at: float | None) -> list[Job]:
    """Give the still-queued ones of ``job_ids`` to ``worker_id``; returns them (detached), oldest first."""
    now = time.time()
    session.execute(update(Job).where(Job.id.in_(job_ids), Job.status == "queued").values(
        status="running", lease_owner=worker_id, lease_expires_at=lease_expires_at,
        attempts=Job.attempts + 1, started_at=func.coalesce(Job.started_at, now), progress_step=0))
    jobs = session.scalars(select(Job).where(Job.id.in_(job_ids), Job.lease_owner == worker_id,
                                             Job.status == "running").order_by(Job.created_at, Job.id)).all()
    for job in jobs:
        session.expunge(job)
    announce(session, [job.id for job in jobs])
    return list(jobs)


class SqlJobQueue:
    def __init__(self, db: Database, *, max_attempts: int = 3) -> None:
        self.db = db
        self.max_attempts = max_attempts
        self._wake = threading.Event()

    # ------------------------------------------------------------------ API side
    def notify(self, job: Job | None = None) -> None:
        """``job`` was queued (its row is committed), or a worker is stopping: wake an in-process
        worker now instead of at its next poll."""
        self._wake.set()

    def wait(self, timeout: float) -> None:
        self._wake.wait(timeout)
        self._wake.clear()

    def depth(self) -> int:
        with self.db.read() as s:
            return s.scalar(select(func.count()).select_from(Job).where(Job.status == "queued")) or 0

    # ------------------------------------------------------------------ worker side
    def reap(self) -> int:
        """Jobs whose worker stopped heartbeating: queue them again, or fail them for good."""
        now = time.time()
        with self.db.read() as s:  # the common case, nothing expired, needs no write lock
            if s.scalar(select(Job.id).where(Job.status == "running", Job.lease_expires_at < now).limit(1)) is None:
                return 0
        with self.db.write() as s:
            dead = s.scalars(select(Job).where(Job.status == "running", Job.lease_expires_at < now)
                             .with_for_update(skip_locked=True)).all()
            for job in dead:
                settle_dead(s, job, max_attempts=self.max_attempts)
            return len(dead)

    def claim(self, worker_id: str, *, max_jobs: int, lease_s: float, window_s: float = 0.0,
              since: float = 0.0) -> list[Job]:
        self.reap()
        with self.db.read() as s:
            head = s.execute(select(Job.batch_key, Job.created_at).where(Job.status == "queued")
                             .order_by(Job.created_at, Job.id).limit(1)).first()
        if head is None:
            return []

        def same() -> int:
            with self.db.read() as s:
                return s.scalar(select(func.count()).select_from(Job)
                                .where(Job.status == "queued", Job.batch_key == head.batch_key)) or 0

        wait_for_company(same, oldest=head.created_at, since=since, window_s=window_s, max_jobs=max_jobs)
        now = time.time()
        with self.db.write() as s:
            # FOR UPDATE SKIP LOCKED lets PostgreSQL workers claim side by side (SQLite ignores it:
            # BEGIN IMMEDIATE already serialises claims)
            ids = s.scalars(select(Job.id).where(Job.status == "queued", Job.batch_key == head.batch_key)
                            .order_by(Job.created_at, Job.id).limit(max_jobs).with_for_update(skip_locked=True)).all()
            if not ids:
                return []
            return mark_running(s, ids, worker_id, now + lease_s)

    def extend(self, worker_id: str, job_ids: Sequence[str], lease_s: float) -> set[str]:
        with self.db.write() as s:
            s.execute(update(Job).where(Job.id.in_(job_ids), Job.lease_owner == worker_id, Job.status == "running")
                      .values(lease_expires_at=time.time() + lease_s))
            return set(s.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.lease_owner == worker_id,
                                                      Job.status == "running")).all())

    def cancel_requested(self, job_ids: Sequence[str]) -> set[str]:
        with self.db.read() as s:
            return set(s.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.cancel_requested.is_(True))).all())

    def report_progress(self, worker_id: str, job_ids: Sequence[str], step: int, total: int,
                        preview_png: bytes | None) -> None:
        values: dict = {"progress_step": step, "progress_total": total}
        if preview_png is not None:
            values["preview_png"] = preview_png
        with self.db.write() as s:
            s.execute(update(Job).where(Job.id.in_(job_ids), Job.lease_owner == worker_id, Job.status == "running")
                      .values(**values))
            announce(s, job_ids)

    def _held(self, s: Session, worker_id: str, job_id: str) -> Job | None:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or job.status != "running" or job.lease_owner != worker_id:
            return None
        return job

    def complete(self, worker_id: str, job_id: str, images: Sequence[StoredImage],
                 write_file: Callable[[str, bytes], None], path_for: Callable[[str, int], str]) -> bool:
        """Store the results and finish the job, only while this worker still holds it.

        Files are written inside the transaction: nobody else can claim or finish the job until it
        commits, and a crash before the commit leaves files that the next run overwrites (their
        path is a function of job and index)."""
        with self.db.write() as s:
            job = self._held(s, worker_id, job_id)
            if job is None:
                return False
            now = time.time()
            for item in images:
                rel = path_for(job_id, item.index)
                write_file(rel, item.png)
                s.add(Image(id=item.id, job_id=job_id, user_id=job.user_id, index=item.index, path=rel,
                            width=item.width, height=item.height, seed=item.seed,
                            prompt=str(job.params.get("prompt", "")), infotext=item.infotext,
                            recipe=item.recipe, created_at=now))
            job.progress_step = job.progress_total
            finish(s, job, "succeeded")
            return True

    def fail(self, worker_id: str, job_id: str, code: str, message: str) -> bool:
        with self.db.write() as s:
            job = self._held(s, worker_id, job_id)
            if job is None:
                return False
            finish(s, job, "failed", code=code, message=message)
            return True

    def cancel_running(self, worker_id: str, job_id: str) -> bool:
        with self.db.write() as s:
            job = self._held(s, worker_id, job_id)
            if job is None:
                return False
            finish(s, job, "cancelled", code="cancelled", message="cancelled by the user")
            return True

    def release(self, worker_id: str, job_id: str) -> bool:
        """Put a claimed job back untouched (its batch was stopped for another job's sake)."""
        with self.db.write() as s:
            job = self._held(s, worker_id, job_id)
            if job is None:
                return False
            job.status = "queued"
            job.lease_owner = None
            job.lease_expires_at = None
            job.attempts = max(0, job.attempts - 1)
            job.progress_step = 0
            announce(s, [job_id])
            return True
