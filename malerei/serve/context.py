"""Everything a request handler or worker needs, built once by ``create_app`` or the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field

from malerei.serve.catalog import ModelCatalog
from malerei.serve.config import Settings, check_queue_url
from malerei.serve.db.migrate import upgrade
from malerei.serve.db.session import Database
from malerei.serve.jobs.changes import JobChanges
from malerei.serve.jobs.queue import JobQueue, SqlJobQueue
from malerei.serve.metrics import Metrics
from malerei.serve.ratelimit import RateLimiter, RedisTokenBuckets, TokenBuckets
from malerei.serve.storage import ImageStore


@dataclass(kw_only=True)
class Services:
    settings: Settings
    db: Database
    queue: JobQueue
    images: ImageStore
    inputs: ImageStore
    catalog: ModelCatalog
    limiter: RateLimiter
    metrics: Metrics
    changes: JobChanges = field(default_factory=JobChanges)  # this process's worker -> its event streams


def build_services(settings: Settings) -> Services:
    """Create the data dir, migrate the database and wire the parts together."""
    check_queue_url(settings.queue_url)
    settings.prepare_dirs()
    db = Database(settings.db_url)
    upgrade(db)
    queue, limiter = _queue_and_limiter(settings, db)
    return Services(
        settings=settings,
        db=db,
        queue=queue,
        images=ImageStore(settings.images_dir),
        inputs=ImageStore(settings.inputs_dir),
        catalog=ModelCatalog(settings.resolved_models_dir, default=settings.default_model),
        limiter=limiter,
        metrics=Metrics(db),
    )


def _queue_and_limiter(settings: Settings, db: Database) -> tuple[JobQueue, RateLimiter]:
    """The database queue and in-memory rate limits, or both in Redis when a Redis URL is set."""
    rate = {"per_minute": settings.rate_limit_per_minute, "burst": settings.rate_limit_burst}
    if settings.redis_url is None:
        return SqlJobQueue(db, max_attempts=settings.max_attempts), TokenBuckets(**rate)
    from malerei.serve.jobs.redis_queue import RedisJobQueue, connect

    client = connect(settings.redis_url)
    queue = RedisJobQueue(db, client, prefix=settings.redis_prefix, max_attempts=settings.max_attempts,
                          lease_s=settings.lease_s)
    return queue, RedisTokenBuckets(client, prefix=settings.redis_prefix, **rate)
