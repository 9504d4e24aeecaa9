"""Everything a request handler or worker needs, built once by ``create_app`` or the CLI."""

from __future__ import annotations

from dataclasses import dataclass

from malerei.serve.catalog import ModelCatalog
from malerei.serve.config import Settings
from malerei.serve.db.migrate import upgrade
from malerei.serve.db.session import Database
from malerei.serve.jobs.queue import SqlJobQueue
from malerei.serve.metrics import Metrics
from malerei.serve.ratelimit import RateLimiter, TokenBuckets
from malerei.serve.storage import ImageStore


@dataclass(kw_only=True)
class Services:
    settings: Settings
    db: Database
    queue: SqlJobQueue
    images: ImageStore
    inputs: ImageStore
    catalog: ModelCatalog
    limiter: RateLimiter
    metrics: Metrics


def build_services(settings: Settings) -> Services:
    """Create the data dir, migrate the database and wire the parts together."""
    settings.prepare_dirs()
    db = Database(settings.db_url)
    upgrade(db)
    return Services(
        settings=settings,
        db=db,
        queue=SqlJobQueue(db, max_attempts=settings.max_attempts),
        images=ImageStore(settings.images_dir),
        inputs=ImageStore(settings.inputs_dir),
        catalog=ModelCatalog(settings.resolved_models_dir, default=settings.default_model),
        limiter=TokenBuckets(per_minute=settings.rate_limit_per_minute, burst=settings.rate_limit_burst),
        metrics=Metrics(db),
    )
