"""The worker survives faults: ``kill -9`` of the separate worker process at random points.

Jobs queued while no worker runs wait (and survive an API restart); a job whose worker died runs
again; a job that keeps killing its worker is failed after 3 tries with the reason; every result
is stored exactly once (database rows and files on disk); the ledger stays exact.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from serving import REPO, Server, cli_argv, make_account, model_args, server_env

LEASE = "2"


class WorkerProcess:
    def __init__(self, data_dir: Path, models_dir: Path, n: int) -> None:
        self.log = data_dir / f"worker-{n}.log"
        handle = open(self.log, "wb")
        self.proc = subprocess.Popen(cli_argv("worker", "--data-dir", str(data_dir), *model_args(models_dir),
                                              "--lease-seconds", LEASE), cwd=REPO, env=server_env(),
                                     stdout=handle, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready" in self.log.read_text(errors="replace"):
                return
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.1)
        raise AssertionError(f"worker not ready: {self.log.read_text()[-3000:]}")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


def rows(db: Path, sql: str, *args) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def wait_until(predicate, timeout: float = 120, every: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_kill_9_worker_at_random_points(tmp_path, tiny_models_dir):
    seed = int(os.environ.get("MALEREI_KILL_SEED", time.time()))
    rng = random.Random(seed)
    print(f"kill test seed {seed}")
    db = tmp_path / "malerei.db"
    user = make_account(tmp_path, "victim", credits=10_000)
    server = Server(data_dir=tmp_path, args=[*model_args(tiny_models_dir), "--no-worker"]).start()
    import httpx

    client = httpx.Client(base_url=server.url, timeout=60, headers=user.headers)
    try:
        # The poison job has a size of its own (a batch of its own) and is the oldest: every new
        # worker takes it first, and the test kills every worker that runs it.
        poison = client.post("/v1/jobs", json={"prompt": "poison", "width": 72, "height": 72, "steps": 2}).json()
        jobs = [client.post("/v1/jobs", json={"prompt": f"circle {i}", "width": 64, "height": 64,
                                              "steps": rng.randint(4, 10), "batch_size": rng.randint(1, 3),
                                              "seed": i}).json() for i in range(14)]
        assert all(j["status"] == "queued" for j in jobs)
        # queued jobs survive a restart of the API server
        server.stop()
        server.start()

        workers = []
        status = lambda job_id: rows(db, "SELECT status, attempts FROM jobs WHERE id=?", job_id)[0]  # noqa: E731
        for attempt in (1, 2, 3):  # the poison job kills its worker three times
            worker = WorkerProcess(tmp_path, tiny_models_dir, len(workers))
            workers.append(worker)
            worker.wait_ready()
            wait_until(lambda: status(poison["id"]) == ("running", attempt))
            worker.kill9()
        def running() -> int:
            return rows(db, "SELECT count(*) FROM jobs WHERE status='running' AND id != ?", poison["id"])[0][0]

        def open_jobs() -> int:
            return rows(db, "SELECT count(*) FROM jobs WHERE status IN ('queued', 'running') AND id != ?",
                        poison["id"])[0][0]

        kills = 0
        for _ in range(2):  # then kills at random points while ordinary batches are running
            worker = WorkerProcess(tmp_path, tiny_models_dir, len(workers))
            workers.append(worker)
            worker.wait_ready()
            wait_until(lambda: running() > 0 or open_jobs() == 0)
            if open_jobs() == 0:
                worker.stop()
                break
            time.sleep(rng.uniform(0.0, 1.0))
            worker.kill9()
            kills += 1
        assert kills >= 1
        final = WorkerProcess(tmp_path, tiny_models_dir, len(workers))
        final.wait_ready()
        ids = [poison["id"]] + [j["id"] for j in jobs]
        wait_until(lambda: all(status(i)[0] in ("succeeded", "failed") for i in ids), timeout=300, every=0.2)
        final.stop()
    finally:
        client.close()
        server.stop()

    # the poison job: failed after 3 tries, with the reason, refunded
    state, attempts, code, message = rows(db, "SELECT status, attempts, error_code, error_message FROM jobs "
                                              "WHERE id=?", poison["id"])[0]
    assert (state, attempts, code) == ("failed", 3, "worker_died")
    assert "died 3 times" in message

    # nothing lost, nothing stored twice
    succeeded = 0
    for job in jobs:
        state, attempts, code, n_images, message = rows(db, "SELECT status, attempts, error_code, n_images, "
                                                            "error_message FROM jobs WHERE id=?", job["id"])[0]
        indexes = sorted(i for (i,) in rows(db, "SELECT \"index\" FROM images WHERE job_id=?", job["id"]))
        if state == "succeeded":
            succeeded += 1
            assert indexes == list(range(n_images)), (job["id"], indexes)
        else:  # unlucky: killed in three batches in a row
            assert (state, attempts, code) == ("failed", 3, "worker_died") and indexes == [], message
    assert succeeded >= len(jobs) - 3
    on_disk = sorted(str(p.relative_to(tmp_path / "images")) for p in (tmp_path / "images").rglob("*")
                     if p.is_file())
    recorded = sorted(path for (path,) in rows(db, "SELECT path FROM images"))
    assert on_disk == recorded  # no orphan or duplicate file (temporary files included)
    for path in recorded:
        with Image.open(tmp_path / "images" / path) as image:
            image.load()

    # the ledger: one charge per job, one refund per failed job, balance == sum of entries
    for job_id in [poison["id"]] + [j["id"] for j in jobs]:
        state = status(job_id)[0]
        reasons = sorted(r for (r,) in rows(db, "SELECT reason FROM credit_entries WHERE job_id=?", job_id))
        assert reasons == (["charge", "refund"] if state == "failed" else ["charge"]), (job_id, reasons)
    balance = rows(db, "SELECT balance FROM users WHERE name='victim'")[0][0]
    assert balance == rows(db, "SELECT sum(delta) FROM credit_entries e JOIN users u ON u.id=e.user_id "
                               "WHERE u.name='victim'")[0][0]
    spent = sum(cost for (cost,) in rows(db, "SELECT cost FROM jobs WHERE status='succeeded'"))
    assert balance == 10_000 - spent
