"""What PostgreSQL needs beyond SQLite, at library level on a real server (backends.py).

SQLite's single writer (``BEGIN IMMEDIATE``) made check-then-write code safe; on PostgreSQL the
same code runs in READ COMMITTED transactions side by side, so these check the places that take
locks instead: the per-user queue cap under parallel submissions, migrations started by several
processes at once on an empty database, webhook deliveries claimed by one worker each.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from malerei.serve.config import Settings
from malerei.serve.context import build_services
from malerei.serve.db.migrate import upgrade
from malerei.serve.db.session import Database
from serving import TINY_MODEL


@pytest.mark.parametrize("stack_name", ["sqlite", "postgresql"])
def test_parallel_submissions_respect_the_queue_cap(stack_name, make_stack, tmp_path, tiny_models_dir):
    from malerei.serve.accounts.users import create_user
    from malerei.serve.credits import grant
    from malerei.serve.errors import ApiError
    from malerei.serve.jobs.service import submit
    from malerei.serve.jobs.spec import Txt2Img

    stack = make_stack(stack_name)
    services = build_services(Settings(data_dir=tmp_path, database_url=stack.database_url, max_queued_per_user=3,
                                       models_dir=tiny_models_dir, default_model=TINY_MODEL))
    with services.db.write() as s:
        user = create_user(s, "racer")
        grant(s, user, 1000)
    start = threading.Barrier(20)

    def attempt(i: int) -> int:
        start.wait()
        try:
            submit(services, user_id=user.id, api_key_id=None,
                   spec=Txt2Img(prompt=f"p{i}", width=64, height=64, steps=2))
            return 202
        except ApiError as exc:
            return exc.status

    with ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(attempt, range(20)))
    assert sorted(codes) == [202] * 3 + [429] * 17, codes
    with services.db.read() as s:
        from malerei.serve.credits import balance, ledger_sum

        assert balance(s, user.id) == ledger_sum(s, user.id) == 1000 - 3 * 1  # 64 px, 2 steps: 1 credit
    services.db.dispose()


def test_migrations_started_together_on_an_empty_database(pg_cluster):
    url = pg_cluster.create_database()
    databases = [Database(url) for _ in range(4)]
    start = threading.Barrier(len(databases))

    def migrate(db: Database) -> None:
        start.wait()
        upgrade(db)

    with ThreadPoolExecutor(len(databases)) as pool:
        list(pool.map(migrate, databases))  # raises if two of them created the tables
    from sqlalchemy import text

    with databases[0].read() as s:
        assert s.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    for db in databases:
        db.dispose()


def test_a_plain_postgresql_url_uses_psycopg(tmp_path):
    settings = Settings(data_dir=tmp_path, database_url="postgresql://u:p@db.example/malerei")
    assert settings.db_url == "postgresql+psycopg://u:p@db.example/malerei"
    assert Settings(data_dir=tmp_path, database_url="postgresql+psycopg2://h/d").db_url == "postgresql+psycopg2://h/d"


def test_each_webhook_is_claimed_by_one_sender(pg_cluster, tmp_path):
    """Two workers' webhook loops at once: FOR UPDATE SKIP LOCKED gives every delivery to one."""
    from malerei.serve.accounts.users import create_user
    from malerei.serve.db.models import Job
    from malerei.serve.jobs.webhooks import WebhookSender

    services = build_services(Settings(data_dir=tmp_path, database_url=pg_cluster.create_database()))
    with services.db.write() as s:
        user = create_user(s, "hooked")
        for i in range(6):
            s.add(Job(id=f"job_{i}", user_id=user.id, kind="txt2img", model="m", params={}, batch_key="k",
                      n_images=0, cost=1, status="succeeded", attempts=1, cancel_requested=False,
                      created_at=time.time(), progress_step=0, progress_total=1, webhook_url="http://x/",
                      webhook_status="pending", webhook_next_at=0.0, webhook_attempts=0))
    sent: list[str] = []
    lock = threading.Lock()

    class Recording(WebhookSender):
        def _send(self, job_id, url, attempts, secret):  # noqa: ANN001 - the sender's own signature
            time.sleep(0.2)  # the other sender runs meanwhile
            with lock:
                sent.append(job_id)

    senders = [Recording(services), Recording(services)]
    start = threading.Barrier(2)

    def deliver(sender: WebhookSender) -> int:
        start.wait()
        return sender.deliver_due(limit=10)

    with ThreadPoolExecutor(2) as pool:
        counts = list(pool.map(deliver, senders))
    assert sorted(sent) == [f"job_{i}" for i in range(6)], sent  # each once
    assert sum(counts) == 6
    services.db.dispose()


def test_workers_elsewhere_wake_event_streams_through_notify(pg_cluster, tmp_path):
    """A worker in another process (here: another Database) changes a job; the API server's
    PostgresChangeFeed hears the job's id at commit, not a rolled-back change, and hears again
    after its connection was killed."""
    import queue

    from sqlalchemy import text

    from malerei.serve.accounts.users import create_user
    from malerei.serve.db.models import Job
    from malerei.serve.jobs.changes import JobChanges, PostgresChangeFeed, announce
    from malerei.serve.jobs.queue import SqlJobQueue

    class Heard(JobChanges):
        def __init__(self) -> None:
            super().__init__()
            self.heard: queue.Queue = queue.Queue()

        def changed(self, job_ids=None) -> None:  # noqa: ANN001 - JobChanges' signature
            self.heard.put(None if job_ids is None else sorted(job_ids))
            super().changed(job_ids)

        def next(self, timeout: float = 5.0):  # noqa: ANN201
            return self.heard.get(timeout=timeout)

        def quiet(self, wait_s: float = 0.5) -> bool:
            time.sleep(wait_s)
            return self.heard.empty()

    url = pg_cluster.create_database()
    services = build_services(Settings(data_dir=tmp_path, database_url=url))
    worker_db = Database(services.db.url)  # the worker's own pool, as in a `malerei worker` process
    with worker_db.write() as s:
        user = create_user(s, "streamer")
        for name in ("job_x", "job_y"):
            s.add(Job(id=name, user_id=user.id, kind="txt2img", model="m", params={}, batch_key="k",
                      n_images=1, cost=1, status="queued", attempts=0, cancel_requested=False,
                      created_at=time.time(), progress_step=0, progress_total=4))
    changes = Heard()
    feed = PostgresChangeFeed(services.db.url, changes, timeout_s=0.1).start()
    try:
        assert feed.listening and changes.quiet(0.2)
        worker = SqlJobQueue(worker_db)
        claimed = worker.claim("w1", max_jobs=4, lease_s=60)
        assert [j.id for j in claimed] == ["job_x", "job_y"]
        assert changes.next() == ["job_x", "job_y"]
        worker.report_progress("w1", ["job_y"], 2, 4, None)
        assert changes.next() == ["job_y"]
        try:
            with worker_db.write() as s:
                announce(s, ["job_x"])
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        assert changes.quiet()  # a rolled-back change is never announced
        with services.db.read() as s:  # the server kills the feed's connection
            s.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"))
        assert changes.next() is None  # connection lost: every stream is told to read again
        deadline = time.time() + 10
        while not feed.listening and time.time() < deadline:
            time.sleep(0.05)
        assert feed.listening
        assert worker.fail("w1", "job_x", "engine_error", "boom")
        assert changes.next() == ["job_x"]
        many = [f"job_{i:040d}" for i in range(400)]  # over NOTIFY's 8000-byte payload: split
        with worker_db.write() as s:
            announce(s, many)
        heard = changes.next() + changes.next() + changes.next()
        assert sorted(heard) == many
    finally:
        feed.stop()
        worker_db.dispose()
        services.db.dispose()
    assert not feed.listening
