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
