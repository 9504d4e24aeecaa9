"""The job queue: an interface, and its implementation on the SQL database.

The API only calls :meth:`JobQueue.notify` and :meth:`JobQueue.depth` (the job row itself is
written in the submission transaction); workers call the rest. Workers hold *leases*: a claimed
job carries ``lease_owner`` and ``lease_expires_at``, which the worker's heartbeat extends. A job
whose lease ran out belongs to a dead worker and is queued again, or failed once it has been
tried ``max_attempts`` times. Results are written only by the lease holder, inside the
transaction that marks the job finished, so each result is stored exactly once.

:class:`SqlJobQueue` runs on SQLite (``BEGIN IMMEDIATE`` serialises claims) and PostgreSQL
(``FOR UPDATE SKIP LOCKED`` claims, row locks on completion); a Redis-backed queue implements the
same methods.
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
    def notify(self) -> None: ...
    def depth(self) -> int: ...
    def claim(self, worker_id: str, *, max_jobs: int, lease_s: float, window_s: float) -> list[Job]: ...
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


class SqlJobQueue:
    def __init__(self, db: Database, *, max_attempts: int = 3) -> None:
        self.db = db
        self.max_attempts = max_attempts
        self._wake = threading.Event()

    # ------------------------------------------------------------------ API side
    def notify(self) -> None:
        """A job was queued: wake an in-process worker now instead of at its next poll."""
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
                if job.cancel_requested:
                    finish(s, job, "cancelled", code="cancelled", message="cancelled by the user")
                elif job.attempts >= self.max_attempts:
                    finish(s, job, "failed", code="worker_died",
                           message=f"the worker running this job died {job.attempts} times "
                                   f"(limit {self.max_attempts}); the job was not retried again")
                else:
                    job.status = "queued"
                    job.lease_owner = None
                    job.lease_expires_at = None
                    job.progress_step = 0
            return len(dead)

    def claim(self, worker_id: str, *, max_jobs: int, lease_s: float, window_s: float = 0.0) -> list[Job]:
        self.reap()
        with self.db.read() as s:
            head = s.execute(select(Job.batch_key, Job.created_at).where(Job.status == "queued")
                             .order_by(Job.created_at, Job.id).limit(1)).first()
            if head is None:
                return []
            if window_s > 0 and max_jobs > 1:
                same = s.scalar(select(func.count()).select_from(Job)
                                .where(Job.status == "queued", Job.batch_key == head.batch_key)) or 0
                wait = head.created_at + window_s - time.time()
                if same < max_jobs and wait > 0:
                    time.sleep(min(wait, window_s))
        now = time.time()
        with self.db.write() as s:
            # FOR UPDATE SKIP LOCKED lets PostgreSQL workers claim side by side (SQLite ignores it:
            # BEGIN IMMEDIATE already serialises claims)
            ids = s.scalars(select(Job.id).where(Job.status == "queued", Job.batch_key == head.batch_key)
                            .order_by(Job.created_at, Job.id).limit(max_jobs).with_for_update(skip_locked=True)).all()
            if not ids:
                return []
            s.execute(update(Job).where(Job.id.in_(ids), Job.status == "queued").values(
                status="running", lease_owner=worker_id, lease_expires_at=now + lease_s,
                attempts=Job.attempts + 1, started_at=func.coalesce(Job.started_at, now), progress_step=0))
            jobs = s.scalars(select(Job).where(Job.id.in_(ids), Job.lease_owner == worker_id,
                                               Job.status == "running").order_by(Job.created_at, Job.id)).all()
            for job in jobs:
                s.expunge(job)
            return list(jobs)

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
            return True
