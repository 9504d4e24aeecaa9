"""The worker survives faults: ``kill -9`` of separate worker processes at random points.

Jobs queued while no worker runs wait (and survive an API restart); a job whose worker died runs
again; a job that keeps killing its worker is failed after 3 tries with the reason; every result
is stored exactly once (database rows and files on disk); the ledger stays exact. Run on each
stack: SQLite with one worker at a time, PostgreSQL with two workers claiming side by side, and
PostgreSQL with the Redis queue and two workers.
"""

from __future__ import annotations

import os
import random
import re
import time

import pytest
from PIL import Image
from sqlalchemy import create_engine, text

from serving import Server, WorkerProcess, make_account, model_args

LEASE = "2"


def reader(url: str):
    """``rows(sql, **params)`` on the deployment's database (its own engine, no pool)."""
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool)

    def rows(sql: str, **params) -> list[tuple]:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params).all()]

    return rows


def wait_until(predicate, timeout: float = 120, every: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError("timed out")


@pytest.mark.slow
@pytest.mark.parametrize("stack_name, n_workers", [("sqlite", 1), ("postgresql", 2), ("postgresql+redis", 2)])
def test_kill_9_worker_at_random_points(stack_name, n_workers, make_stack, tmp_path, tiny_models_dir):
    seed = int(os.environ.get("MALEREI_KILL_SEED", time.time()))
    rng = random.Random(seed)
    print(f"kill test seed {seed} on {stack_name} with {n_workers} worker(s)")
    stack = make_stack(stack_name)
    user = make_account(tmp_path, "victim", credits=10_000, stack=stack)
    rows = reader(stack.db_url(tmp_path))
    server = Server(data_dir=tmp_path, stack=stack, args=[*model_args(tiny_models_dir), "--no-worker"]).start()
    import httpx

    client = httpx.Client(base_url=server.url, timeout=60, headers=user.headers)
    workers: dict[int, WorkerProcess] = {}  # pid -> the live workers
    started = 0

    def start_worker() -> None:
        """A new worker process; not waited for (it warms up while the test goes on)."""
        nonlocal started
        worker = WorkerProcess(tmp_path, tiny_models_dir, started, stack=stack, args=["--lease-seconds", LEASE])
        started += 1
        workers[worker.pid] = worker

    def holder(job_id: str) -> WorkerProcess | None:
        """The live worker process named in the job's lease (worker ids are host:pid:random)."""
        owner = rows("SELECT lease_owner FROM jobs WHERE id=:id", id=job_id)[0][0]
        match = re.match(r"[^:]*:(\d+):", owner or "")
        return workers.get(int(match.group(1))) if match else None

    def kill(worker: WorkerProcess) -> None:
        worker.kill9()
        del workers[worker.pid]

    try:
        # The poison job has a size of its own (a batch of its own) and is the oldest: the next
        # claim takes it first, and the test kills every worker that runs it as soon as it runs
        # (150 steps: seconds; the kill comes within 0.1 s).
        poison = client.post("/v1/jobs", json={"prompt": "poison", "width": 136, "height": 136,
                                               "steps": 150}).json()
        jobs = [client.post("/v1/jobs", json={"prompt": f"circle {i}", "width": 64, "height": 64,
                                              "steps": rng.randint(4, 10), "batch_size": rng.randint(1, 3),
                                              "seed": i}).json() for i in range(14)]
        assert all(j["status"] == "queued" for j in jobs)
        # queued jobs survive a restart of the API server
        server.stop()
        server.start()

        status = lambda job_id: rows("SELECT status, attempts FROM jobs WHERE id=:id", id=job_id)[0]  # noqa: E731
        for _ in range(n_workers):
            start_worker()
        for attempt in (1, 2, 3):  # the poison job kills its worker three times
            wait_until(lambda: status(poison["id"]) == ("running", attempt) and holder(poison["id"]) is not None)
            kill(holder(poison["id"]))
            start_worker()

        def running() -> list[str]:
            return [i for (i,) in rows("SELECT id FROM jobs WHERE status='running' AND id != :p", p=poison["id"])]

        kills = 0
        for round_ in range(2):  # then kills at random points while ordinary batches are running
            # fresh, longer jobs each try: a fast machine may finish a batch between two looks, so a
            # round submits again until it finds a running job to kill (at most five tries)
            for try_ in range(5):
                jobs += [client.post("/v1/jobs", json={"prompt": f"square {round_}.{try_}.{i}", "width": 64,
                                                       "height": 64, "steps": rng.randint(40, 80),
                                                       "batch_size": rng.randint(1, 3),
                                                       "seed": 100 + 50 * round_ + 10 * try_ + i}).json()
                         for i in range(3)]
                wait_until(lambda: running() or all(status(j["id"])[0] in ("succeeded", "failed") for j in jobs))
                time.sleep(rng.uniform(0.0, 0.3))
                victims = [w for w in map(holder, running()) if w is not None]
                if victims:
                    kill(rng.choice(victims))
                    kills += 1
                    start_worker()
                    break
        assert kills >= 1, "no running batch to kill in five tries"
        ids = [poison["id"]] + [j["id"] for j in jobs]
        wait_until(lambda: all(status(i)[0] in ("succeeded", "failed") for i in ids), timeout=300, every=0.2)
    finally:
        for worker in workers.values():
            worker.terminate()
        for worker in workers.values():
            worker.stop()
        client.close()
        server.stop()

    # the poison job: failed after 3 tries, with the reason, refunded
    state, attempts, code, message = rows("SELECT status, attempts, error_code, error_message FROM jobs "
                                          "WHERE id=:id", id=poison["id"])[0]
    assert (state, attempts, code) == ("failed", 3, "worker_died")
    assert "died 3 times" in message

    # nothing lost, nothing stored twice: an ordinary job dies at most twice (two random kills), so
    # every one succeeds, with each of its images once
    for job in jobs:
        state, attempts, n_images, message = rows("SELECT status, attempts, n_images, error_message FROM jobs "
                                                  "WHERE id=:id", id=job["id"])[0]
        assert state == "succeeded" and attempts <= 3, (job["id"], state, attempts, message)
        indexes = sorted(i for (i,) in rows('SELECT "index" FROM images WHERE job_id=:id', id=job["id"]))
        assert indexes == list(range(n_images)), (job["id"], indexes)
    on_disk = sorted(str(p.relative_to(tmp_path / "images")) for p in (tmp_path / "images").rglob("*")
                     if p.is_file())
    recorded = sorted(path for (path,) in rows("SELECT path FROM images"))
    assert on_disk == recorded  # no orphan or duplicate file (temporary files included)
    for path in recorded:
        with Image.open(tmp_path / "images" / path) as image:
            image.load()

    # the ledger: one charge per job, one refund per failed job, balance == sum of entries
    for job_id in ids:
        state = status(job_id)[0]
        reasons = sorted(r for (r,) in rows("SELECT reason FROM credit_entries WHERE job_id=:id", id=job_id))
        assert reasons == (["charge", "refund"] if state == "failed" else ["charge"]), (job_id, reasons)
    balance = rows("SELECT balance FROM users WHERE name='victim'")[0][0]
    assert balance == rows("SELECT sum(delta) FROM credit_entries e JOIN users u ON u.id=e.user_id "
                           "WHERE u.name='victim'")[0][0]
    spent = sum(cost for (cost,) in rows("SELECT cost FROM jobs WHERE status='succeeded'"))
    assert balance == 10_000 - spent


def test_a_write_killed_midway_is_cleaned_up_by_the_next_run(tmp_path):
    """What a worker killed while writing a result leaves (its temporary file) is overwritten
    and renamed into place when the job runs again: no orphan file."""
    from malerei.serve.storage import ImageStore

    store = ImageStore(tmp_path)
    (tmp_path / "job_x").mkdir()
    (tmp_path / "job_x" / ".0.png.tmp").write_bytes(b"the first half of a PNG")
    store.write(store.result_path("job_x", 0), b"a whole PNG")
    assert [p.name for p in (tmp_path / "job_x").iterdir()] == ["0.png"]
    assert store.read("job_x/0.png") == b"a whole PNG"
