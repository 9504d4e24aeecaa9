"""The job queue in Redis, for API servers and workers on several machines.

The database stays the record: the API writes the job row in the submission transaction, and a
worker writes the results in the transaction that marks the job finished, only while the row's
``lease_owner`` is that worker (checked under the row lock, as in :class:`SqlJobQueue`). Redis
carries what the workers need to find work and to notice each other's deaths:

``<prefix>q:<batch key>``   sorted set of queued job ids, scored by submission time
``<prefix>ready``           sorted set of batch keys, scored by their oldest job (FIFO over keys)
``<prefix>leases``          sorted set of claimed job ids, scored by lease expiry (Redis clock, ms)
``<prefix>owner``           hash: claimed job id -> worker id
``<prefix>wake``            list that idle workers block on (``BLPOP``); a submission pushes to it
``<prefix>sweep``           lock key of the periodic sweep (one worker at a time)

A claim is one Lua script (atomic in Redis): take the oldest job's batch key, move up to
``max_jobs`` of its ids to ``leases``/``owner``, then mark those rows running in the database;
ids the database no longer has as queued (cancelled meanwhile) are let go. Heartbeats extend the
leases in Redis. A lease that runs out belongs to a dead worker: any worker's claim reaps it,
deciding in the database (run again, cancel, or fail after ``max_attempts``) and then putting the
id back into its queue.

Delivery is at least once, and that is safe: a job id seen twice (a crash between two steps, a
Redis restart) is claimed in the database by ``UPDATE ... WHERE status = 'queued'`` once only,
and a result is stored only by the worker named in the row. What Redis may lose is restored by
the sweep every ``SWEEP_S``: queued rows missing from Redis are queued again (an API server that
died between its commit and its push, a Redis restart), running rows without a lease get one for
their worker (whose heartbeats then extend it, or whose death is then noticed).

Needs Redis >= 6.2 (``ZADD ... LT``), one instance or a primary with replicas (not Cluster:
the scripts touch keys they compute). Every process of a deployment must use the same queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import select

from malerei.serve.db.models import Job
from malerei.serve.db.session import Database
from malerei.serve.jobs.queue import ACTIVE, SqlJobQueue, StoredImage, mark_running, settle_dead, wait_for_company

log = logging.getLogger("malerei.serve.queue")

SWEEP_S = 5.0          # how often one worker reconciles Redis with the database
IDLE_WAIT_S = 0.5      # an idle worker blocks this long on the wake list before it looks again
REAP_BATCH = 100       # expired leases settled per claim
WAKE_TOKENS = 256      # the wake list is trimmed to this length

# Lua: Redis runs each script atomically. Times are Redis's own clock (TIME), in milliseconds,
# so workers on machines with skewed clocks agree on lease expiry.
_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"

# KEYS: ready, wake, owner, q; ARGV: job id, batch key, score
_ENQUEUE = """
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 0 end
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[1], 'LT', ARGV[3], ARGV[2])
redis.call('LPUSH', KEYS[2], '1')
redis.call('LTRIM', KEYS[2], 0, %d)
return 1
""" % (WAKE_TOKENS - 1)

# KEYS: ready, leases, owner; ARGV: prefix, worker, max jobs, lease ms, batch key ('' = the head)
# Takes ids of one batch key, oldest first; an id that already has an owner (a duplicate) is
# dropped from the queue, not leased twice.
_CLAIM = _NOW + """
local max, lease, key = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local ids = {}
for round = 1, 2 do
  if key == '' then
    local head = redis.call('ZRANGE', KEYS[1], 0, 0)
    if #head == 0 then break end
    key = head[1]
  end
  local q = ARGV[1] .. 'q:' .. key
  while #ids < max do
    local batch = redis.call('ZRANGE', q, 0, max - #ids - 1)
    if #batch == 0 then break end
    for _, id in ipairs(batch) do
      redis.call('ZREM', q, id)
      if redis.call('HSETNX', KEYS[3], id, ARGV[2]) == 1 then
        redis.call('ZADD', KEYS[2], now + lease, id)
        table.insert(ids, id)
      end
    end
  end
  local nxt = redis.call('ZRANGE', q, 0, 0, 'WITHSCORES')
  if #nxt == 0 then redis.call('ZREM', KEYS[1], key) else redis.call('ZADD', KEYS[1], nxt[2], key) end
  if #ids > 0 then break end
  key = ''
end
return ids
"""

# KEYS: leases, owner; ARGV: worker, lease ms, ids...
_EXTEND = _NOW + """
local held = {}
for i = 3, #ARGV do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[1] then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[i])
    table.insert(held, ARGV[i])
  end
end
return held
"""

# KEYS: leases, owner; ARGV: worker, ids...  (let go of the ids this worker holds)
_ACK = """
local n = 0
for i = 2, #ARGV do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[1] then
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('HDEL', KEYS[2], ARGV[i])
    n = n + 1
  end
end
return n
"""

# KEYS: leases, owner; ARGV: limit -> flat list id, owner ('' if none) of expired leases
_EXPIRED = _NOW + """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
for _, id in ipairs(ids) do
  table.insert(out, id)
  table.insert(out, redis.call('HGET', KEYS[2], id) or '')
end
return out
"""

# KEYS: leases, owner, ready, wake; ARGV: prefix, then (id, owner seen, batch key or '', score)...
# Drops the lease if it is still the one seen (or has no owner); queues the id again when the
# database said so and nobody holds it now.
_SETTLE = """
local n = 0
for i = 2, #ARGV, 4 do
  local id, seen, key, score = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local cur = redis.call('HGET', KEYS[2], id)
  if cur == seen or not cur then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
    cur = false
  end
  if key ~= '' and not cur then
    redis.call('ZADD', ARGV[1] .. 'q:' .. key, score, id)
    redis.call('ZADD', KEYS[3], 'LT', score, key)
    redis.call('LPUSH', KEYS[4], '1')
    n = n + 1
  end
end
redis.call('LTRIM', KEYS[4], 0, %d)
return n
""" % (WAKE_TOKENS - 1)

# KEYS: leases, owner, ready, wake; ARGV: prefix, lease ms, then (id, status, batch key, score,
# db owner)... -> {queued again, leases adopted}
_RECONCILE = _NOW + """
local queued, adopted = 0, 0
for i = 3, #ARGV, 5 do
  local id, status, key, score, owner = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  if redis.call('HEXISTS', KEYS[2], id) == 0 then
    if status == 'queued' then
      if redis.call('ZADD', ARGV[1] .. 'q:' .. key, score, id) == 1 then
        redis.call('ZADD', KEYS[3], 'LT', score, key)
        redis.call('LPUSH', KEYS[4], '1')
        queued = queued + 1
      end
    elseif owner ~= '' then
      redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
      redis.call('HSET', KEYS[2], id, owner)
      adopted = adopted + 1
    end
  end
end
redis.call('LTRIM', KEYS[4], 0, %d)
return {queued, adopted}
""" % (WAKE_TOKENS - 1)


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def connect(url: str):  # noqa: ANN201 - redis.Redis
    """A Redis client for ``url`` that has answered a PING; ConfigError when it cannot be reached."""
    import redis

    from malerei.serve.config import ConfigError

    client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5,
                                  health_check_interval=30)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        raise ConfigError(f"cannot reach the Redis queue at {redact(url)}: {exc}") from None
    return client


class RedisJobQueue(SqlJobQueue):
    """:class:`~malerei.serve.jobs.queue.JobQueue` with the queue, leases and wake-ups in Redis."""

    def __init__(self, db: Database, client, *, prefix: str = "malerei:",  # noqa: ANN001 - redis.Redis
                 max_attempts: int = 3, lease_s: float = 15.0) -> None:
        super().__init__(db, max_attempts=max_attempts)
        self.redis = client
        self.prefix = prefix
        self.lease_s = lease_s
        self.k_ready, self.k_leases, self.k_owner = prefix + "ready", prefix + "leases", prefix + "owner"
        self.k_wake, self.k_sweep = prefix + "wake", prefix + "sweep"
        self._enqueue = client.register_script(_ENQUEUE)
        self._claim = client.register_script(_CLAIM)
        self._extend = client.register_script(_EXTEND)
        self._ack_script = client.register_script(_ACK)
        self._expired = client.register_script(_EXPIRED)
        self._settle_script = client.register_script(_SETTLE)
        self._reconcile = client.register_script(_RECONCILE)

    def _q(self, batch_key: str) -> str:
        return f"{self.prefix}q:{batch_key}"

    # ------------------------------------------------------------------ API side
    def notify(self, job: Job | None = None) -> None:
        """Put a committed job into its Redis queue and wake a worker. A Redis failure here is
        only logged: the job row is committed (and charged), and the sweep queues it later."""
        import redis

        if job is None:
            return
        try:
            self._enqueue(keys=[self.k_ready, self.k_wake, self.k_owner, self._q(job.batch_key)],
                          args=[job.id, job.batch_key, repr(float(job.created_at))])
        except redis.RedisError:
            log.warning("could not queue %s in Redis; the sweep will queue it", job.id, exc_info=True)

    def ping(self) -> bool:
        return bool(self.redis.ping())

    # ------------------------------------------------------------------ worker side
    def wait(self, timeout: float) -> None:
        """Block until a submission pushes a wake token (or ``IDLE_WAIT_S`` passes). While Redis
        is unreachable this only sleeps: the worker's next claim fails, is logged, and is retried."""
        import redis

        wait_s = max(timeout, IDLE_WAIT_S)
        try:
            self.redis.blpop([self.k_wake], timeout=wait_s)
        except redis.RedisError:
            time.sleep(wait_s)

    def claim(self, worker_id: str, *, max_jobs: int, lease_s: float, window_s: float = 0.0,
              since: float = 0.0) -> list[Job]:
        self.reap()
        self.sweep()
        head = self.redis.zrange(self.k_ready, 0, 0, withscores=True)
        if not head:
            return []
        key, oldest = head[0]
        wait_for_company(lambda: self.redis.zcard(self._q(key)), oldest=oldest, since=since, window_s=window_s,
                         max_jobs=max_jobs)
        ids = self._claim(keys=[self.k_ready, self.k_leases, self.k_owner],
                          args=[self.prefix, worker_id, max_jobs, int(lease_s * 1000), key])
        if not ids:
            return []
        # lease_expires_at stays empty: the lease lives in Redis (and no SQL reaper touches these rows)
        with self.db.write() as s:
            # rows locked in one order: two claims of an id delivered twice cannot deadlock
            s.execute(select(Job.id).where(Job.id.in_(ids)).order_by(Job.id).with_for_update())
            jobs = mark_running(s, ids, worker_id, None)
        taken = {job.id for job in jobs}
        stale = [i for i in ids if i not in taken]  # cancelled or finished since they were queued
        if stale:
            self._ack(worker_id, stale)
        return jobs

    def reap(self) -> int:
        """Settle the jobs of workers whose leases ran out: in the database first, then in Redis."""
        flat = self._expired(keys=[self.k_leases, self.k_owner], args=[REAP_BATCH])
        if not flat:
            return 0
        seen = dict(zip(flat[::2], flat[1::2]))
        settle: list[tuple[str, str, str, str]] = []
        with self.db.write() as s:
            # rows another transaction holds (a worker storing its result) are left for the next round
            jobs = s.scalars(select(Job).where(Job.id.in_(seen)).with_for_update(skip_locked=True)).all()
            dead = 0
            for job in jobs:
                owner = seen[job.id]
                if job.status == "running" and job.lease_owner == owner:
                    settle_dead(s, job, max_attempts=self.max_attempts)
                    dead += 1
                requeue = job.batch_key if job.status == "queued" else ""
                settle.append((job.id, owner, requeue, repr(float(job.created_at))))
            found = {job.id for job in jobs}
            if len(found) < len(seen):
                existing = set(s.scalars(select(Job.id).where(Job.id.in_(set(seen) - found))).all())
                settle += [(i, seen[i], "", "0") for i in set(seen) - found - existing]  # no such row
        if settle:
            self._settle(settle)
        if dead:
            log.info("reaped %d job(s) of dead workers", dead)
        return dead

    def sweep(self, *, force: bool = False) -> tuple[int, int]:
        """Reconcile Redis with the database (at most one worker every ``SWEEP_S``): queued rows
        missing from Redis are queued again, running rows without a lease get one for their worker.
        Returns (queued again, leases adopted)."""
        if not force and not self.redis.set(self.k_sweep, "1", nx=True, px=int(SWEEP_S * 1000)):
            return 0, 0
        with self.db.read() as s:
            rows = s.execute(select(Job.id, Job.status, Job.batch_key, Job.created_at, Job.lease_owner)
                             .where(Job.status.in_(ACTIVE)).order_by(Job.created_at).limit(20000)).all()
        queued = adopted = 0
        for start in range(0, len(rows), 500):
            args: list = [self.prefix, int(self.lease_s * 1000)]
            for row in rows[start:start + 500]:
                args += [row.id, row.status, row.batch_key, repr(float(row.created_at)), row.lease_owner or ""]
            q, a = self._reconcile(keys=[self.k_leases, self.k_owner, self.k_ready, self.k_wake], args=args)
            queued, adopted = queued + int(q), adopted + int(a)
        if queued or adopted:
            log.info("sweep: %d queued job(s) put back into Redis, %d lease(s) restored", queued, adopted)
        return queued, adopted

    def extend(self, worker_id: str, job_ids: Sequence[str], lease_s: float) -> set[str]:
        return set(self._extend(keys=[self.k_leases, self.k_owner],
                                args=[worker_id, int(lease_s * 1000), *job_ids]))

    def _ack(self, worker_id: str, job_ids: Sequence[str]) -> None:
        """Let go of leases; a failure is only logged (the lease then runs out and is settled)."""
        import redis

        try:
            self._ack_script(keys=[self.k_leases, self.k_owner], args=[worker_id, *job_ids])
        except redis.RedisError:
            log.warning("could not release %s in Redis; the lease will run out", ", ".join(job_ids), exc_info=True)

    def _settle(self, items: Sequence[tuple[str, str, str, str]]) -> None:
        args: list = [self.prefix]
        for item in items:
            args += list(item)
        self._settle_script(keys=[self.k_leases, self.k_owner, self.k_ready, self.k_wake], args=args)

    def complete(self, worker_id: str, job_id: str, images: Sequence[StoredImage],
                 write_file: Callable[[str, bytes], None], path_for: Callable[[str, int], str]) -> bool:
        done = super().complete(worker_id, job_id, images, write_file, path_for)
        self._ack(worker_id, [job_id])
        return done

    def fail(self, worker_id: str, job_id: str, code: str, message: str) -> bool:
        done = super().fail(worker_id, job_id, code, message)
        self._ack(worker_id, [job_id])
        return done

    def cancel_running(self, worker_id: str, job_id: str) -> bool:
        done = super().cancel_running(worker_id, job_id)
        self._ack(worker_id, [job_id])
        return done

    def release(self, worker_id: str, job_id: str) -> bool:
        """Put a claimed job back (its batch was stopped for another job's sake): queued again in
        the database, then back into its Redis queue at its old place."""
        if not super().release(worker_id, job_id):
            self._ack(worker_id, [job_id])
            return False
        with self.db.read() as s:
            row = s.execute(select(Job.batch_key, Job.created_at, Job.status).where(Job.id == job_id)).one()
        self._settle([(job_id, worker_id, row.batch_key if row.status == "queued" else "",
                       repr(float(row.created_at)))])
        return True
