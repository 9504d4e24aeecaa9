"""Shared by the compatible APIs: submit a native job, wait for it, read uploads.

The compatible APIs are synchronous (the answer carries the images), so they submit an ordinary
job (charged, queued, batched and stored in the gallery like any other) and wait for it.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass
from typing import Any

from fastapi import UploadFile
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select

from malerei.serve.api.deps import Identity
from malerei.serve.context import Services
from malerei.serve.db.models import Image, Job
from malerei.serve.errors import ApiError
from malerei.serve.jobs import service
from malerei.serve.jobs.queue import FINISHED

# How a failed job answers a synchronous API.
FAILURE_STATUS = {"unsupported_kind": 400, "invalid_parameter": 422, "model_error": 422, "cancelled": 400,
                  "worker_died": 503, "engine_error": 500}


@dataclass
class Finished:
    job: Job
    images: list[tuple[Image, bytes]]


async def submit_and_wait(services: Services, identity: Identity, spec: Any, *,
                          allow_cancelled: bool = False) -> Finished:
    job = await run_in_threadpool(service.submit, services, user_id=identity.user.id,
                                  api_key_id=identity.api_key_id, spec=spec)
    deadline = time.monotonic() + services.settings.sync_timeout_s

    def poll() -> Job:
        with services.db.read() as session:
            return session.get(Job, job.id)

    delay = 0.02
    while True:
        current = await run_in_threadpool(poll)
        if current.status in FINISHED:
            break
        if time.monotonic() > deadline:
            raise ApiError(503, "timeout", f"job {job.id} did not finish in {services.settings.sync_timeout_s:.0f} s;"
                                           f" it is still queued: GET /v1/jobs/{job.id}")
        await asyncio.sleep(delay)
        delay = min(0.1, delay * 1.5)
    if current.status == "failed" or (current.status == "cancelled" and not allow_cancelled):
        code = current.error_code or "failed"
        raise ApiError(FAILURE_STATUS.get(code, 500), code, current.error_message or f"job {job.id} {current.status}")

    def load() -> list[tuple[Image, bytes]]:
        with services.db.read() as session:
            rows = session.scalars(select(Image).where(Image.job_id == job.id).order_by(Image.index)).all()
        return [(row, services.images.read(row.path)) for row in rows]

    return Finished(job=current, images=await run_in_threadpool(load))


async def read_upload(upload: UploadFile | None, services: Services, what: str) -> str | None:
    """An uploaded file as base64 (decoded and checked later, with the native spec's rules)."""
    if upload is None:
        return None
    limit = services.settings.max_upload_bytes
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "upload_too_large", f"{what} is larger than {limit} bytes")
    return base64.b64encode(data).decode("ascii")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    width, sep, height = size.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise ApiError(400, "invalid_size", f"size must look like '512x512' or 'auto', got {size!r}")
    return int(width), int(height)


def round8(value: int | None) -> int | None:
    return None if value is None else max(8, int(value) // 8 * 8)


def make_spec(cls: type, **fields: Any) -> Any:
    """Build a native spec; its validation errors answer 422 in the calling API's shape."""
    from pydantic import ValidationError

    try:
        return cls(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        raise ApiError(422, "invalid_parameter", problems) from None


def resolve_model_name(services: Services, name: str | None) -> str | None:
    """A model name from a client, or None (the default) when it is not one of ours."""
    if not name:
        return None
    for info in services.catalog.models():
        if name in (info.name, info.title) or name.split(" [")[0] in (info.name, info.title):
            return info.name
    return None
