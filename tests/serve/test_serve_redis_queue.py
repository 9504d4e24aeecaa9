"""The Redis-backed queue at library level, on a real PostgreSQL and a real Redis (backends.py).

Claims take the oldest job and its compatible company; a dead worker's lease runs out and its
job runs again; the database decides who may store a result, so a job id delivered twice is
still claimed once; what Redis loses (a restart, an API server that died between its commit and
its push) is restored by the sweep; rate limits are shared by every API server on one Redis.
"""

from __future__ import annotations

import itertools
import time

import pytest

from malerei.serve.config import ConfigError, Settings
from malerei.serve.context import build_services
from malerei.serve.db.models import Job
from malerei.serve.jobs.batching import batch_key
from malerei.serve.jobs.redis_queue import RedisJobQueue

_prefixes = itertools.count()


@pytest.fixture
def services(tmp_path, pg_cluster, redis_server):
    settings = Settings(data_dir=tmp_path, database_url=pg_cluster.create_database(), queue_url=redis_server.url,
                        redis_prefix=f"lib{next(_prefixes)}:", lease_s=10)
    built = build_services(settings)
    assert isinstance(built.queue, RedisJobQueue)
    yield built
    built.db.dispose()


def add_jobs(services, specs, *, notify: bool = True) -> list[Job]:
    """Job rows as the API writes them ((size, steps) each, one second apart), queued in Redis
    unless ``notify`` is False (an API server that died after its commit)."""
    from malerei.serve.accounts.users import create_user

    jobs = []
    with services.db.write() as s:
        user = create_user(s, f"u{next(_prefixes)}")
        now = time.time()
        for i, (size, steps) in enumerate(specs):
            params = {"width": size, "height": size, "sampler": "Euler", "scheduler": "Automatic", "steps": steps,
                      "prompt": f"p{i}"}
            job = Job(id=f"job_{i}", user_id=user.id, kind="txt2img", model="m", params=params,
                      batch_key=batch_key(job_id=f"job_{i}", kind="txt2img", model="m", params=params), n_images=1,
                      cost=1, status="queued", attempts=0, cancel_requested=False, created_at=now + i,
                      progress_step=0, progress_total=steps, webhook_status="none", webhook_attempts=0)
            s.add(job)
            jobs.append(job)
    if notify:
        for job in jobs:
            services.queue.notify(job)
    return jobs


def ids(jobs) -> list[str]:
    return [j.id for j in jobs]


def test_claims_take_the_oldest_job_and_its_company_and_dead_leases_run_out(services):
    queue = services.queue
    add_jobs(services, [(64, 4), (64, 4), (128, 4), (64, 8), (64, 4)])
    first = queue.claim("w1", max_jobs=8, lease_s=10)
    assert ids(first) == ["job_0", "job_1", "job_4"]
    assert all(j.status == "running" and j.lease_owner == "w1" and j.attempts == 1 for j in first)
    assert ids(queue.claim("w2", max_jobs=8, lease_s=0.3)) == ["job_2"]  # w2 then stops heartbeating
    assert ids(queue.claim("w2", max_jobs=1, lease_s=10)) == ["job_3"]
    assert queue.claim("w3", max_jobs=8, lease_s=10) == []
    assert queue.extend("w1", ["job_0", "job_2"], 10) == {"job_0"}  # only what it holds
    time.sleep(0.5)
    again = queue.claim("w3", max_jobs=8, lease_s=10)
    assert [(j.id, j.attempts) for j in again] == [("job_2", 2)]
    assert not queue.fail("w2", "job_2", "x", "stale worker")  # the database says w3 holds it now
    assert queue.fail("w3", "job_2", "x", "current worker")
    with services.db.read() as s:
        assert s.get(Job, "job_2").status == "failed"
    # finishing lets go of the Redis lease: nothing is left to reap
    for job in first:
        assert queue.fail("w1", job.id, "x", "done")
    assert queue.fail("w2", "job_3", "x", "done")
    assert queue.redis.zcard(queue.k_leases) == 0 and queue.redis.hlen(queue.k_owner) == 0


def test_a_job_delivered_twice_is_claimed_once(services):
    queue = services.queue
    [job] = add_jobs(services, [(64, 4)])
    queue.notify(job)  # a duplicate push (a retried request, a sweep racing the API)
    assert ids(queue.claim("w1", max_jobs=8, lease_s=10)) == ["job_0"]
    queue.notify(job)  # pushed again while w1 holds it
    queue.sweep(force=True)
    assert queue.claim("w2", max_jobs=8, lease_s=10) == []
    assert queue.complete("w1", "job_0", [], lambda *a: None, lambda *a: "")
    queue.notify(job)  # a stray id of a finished job: dropped by the database's say
    assert queue.claim("w2", max_jobs=8, lease_s=10) == []
    assert queue.redis.hlen(queue.k_owner) == 0
    with services.db.read() as s:
        row = s.get(Job, "job_0")
        assert (row.status, row.attempts, row.lease_owner) == ("succeeded", 1, None)


def test_the_sweep_restores_what_redis_lost(services):
    queue = services.queue
    add_jobs(services, [(64, 4), (128, 4)], notify=False)  # committed, never pushed
    assert queue.redis.zcard(queue.k_ready) == 0
    assert ids(queue.claim("w1", max_jobs=8, lease_s=10)) == ["job_0"]  # the first claim sweeps
    assert queue.sweep() == (0, 0)  # and the next sweep waits its turn
    queue.redis.flushdb()  # Redis restarted empty while w1 runs job_0
    queue.lease_s = 0.3  # leases restored by the sweep last this long
    assert queue.sweep(force=True) == (1, 1)  # job_1 queued again; w1's lease on job_0 restored
    assert queue.extend("w1", ["job_0"], 0.3) == {"job_0"}  # w1's heartbeat holds it again
    assert ids(queue.claim("w2", max_jobs=8, lease_s=10)) == ["job_1"]
    time.sleep(0.5)  # w1 died: its restored lease runs out like any other
    assert [(j.id, j.attempts) for j in queue.claim("w3", max_jobs=8, lease_s=10)] == [("job_0", 2)]
    assert not queue.complete("w1", "job_0", [], lambda *a: None, lambda *a: "")


def test_a_cancelled_queued_job_is_never_run(services):
    from malerei.serve.jobs.service import cancel

    queue = services.queue
    add_jobs(services, [(64, 4), (64, 4)])
    assert cancel(services, "job_0").status == "cancelled"
    assert ids(queue.claim("w1", max_jobs=8, lease_s=10)) == ["job_1"]
    assert queue.redis.hkeys(queue.k_owner) == ["job_1"]  # the cancelled id was let go


def test_released_jobs_go_back_to_their_place(services):
    queue = services.queue
    add_jobs(services, [(64, 4), (64, 4), (64, 4)])
    assert ids(queue.claim("w1", max_jobs=2, lease_s=10)) == ["job_0", "job_1"]
    assert queue.release("w1", "job_1")
    assert not queue.release("w2", "job_0")  # not w2's
    assert [(j.id, j.attempts) for j in queue.claim("w2", max_jobs=8, lease_s=10)] == [("job_1", 1), ("job_2", 1)]


def test_rate_limits_are_shared_through_redis(services, redis_server):
    from malerei.serve.ratelimit import RedisTokenBuckets

    # two API servers: two limiters on one Redis
    a, b = (RedisTokenBuckets(services.queue.redis, prefix=services.settings.redis_prefix, per_minute=60, burst=3)
            for _ in range(2))
    assert [a.hit("key1"), b.hit("key1"), a.hit("key1")] == [None, None, None]
    wait = b.hit("key1")
    assert wait is not None and 0.5 < wait <= 1.0
    assert a.hit("key2") is None  # per key
    time.sleep(1.05)
    assert a.hit("key1") is None  # one token back per second


def test_an_unreachable_or_unknown_queue_is_refused(tmp_path):
    from serving import free_port

    nowhere = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    with pytest.raises(ConfigError, match="cannot reach the Redis queue") as refused:
        build_services(Settings(data_dir=tmp_path, queue_url=nowhere))
    assert "hunter2" not in str(refused.value)
    with pytest.raises(ConfigError, match="'sql'.*redis://"):
        build_services(Settings(data_dir=tmp_path, queue_url="amqp://localhost"))


def test_a_redis_outage_loses_no_job(tmp_path, pg_cluster):
    """Redis stops: submissions are still accepted (the row is the record), /healthz says 503;
    Redis comes back empty: the next claim's sweep finds the jobs."""
    from starlette.testclient import TestClient

    import backends
    from malerei.serve.app import create_app

    redis = backends.RedisServer().start()
    settings = Settings(data_dir=tmp_path, database_url=pg_cluster.create_database(), queue_url=redis.url,
                        in_process_worker=False)
    services = build_services(settings)
    try:
        with TestClient(create_app(settings, services=services)) as client:
            assert client.get("/healthz").json()["queue"] == "ok"
            redis.stop()
            health = client.get("/healthz")
            assert health.status_code == 503 and health.json()["queue"] == "error"
            assert health.json()["database"] == "ok"
            add_jobs(services, [(64, 4), (64, 4)])  # notify() fails quietly: the rows are committed
            again = backends.RedisServer()
            again.port = redis.port
            redis = again.start()  # empty, as after a restart without persistence
            assert client.get("/healthz").status_code == 200
        assert ids(services.queue.claim("w1", max_jobs=8, lease_s=10)) == ["job_0", "job_1"]
    finally:
        redis.stop()
        services.db.dispose()
