"""Submitting and cancelling jobs, shared by the native and the compatible APIs.

Submission resolves a spec to concrete parameters (model defaults filled in, a random seed
drawn), checks the server's limits, stores input images (decoded safely and re-encoded), and then
in one write transaction checks the user's queue cap, charges credits and inserts the job.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from malerei.serve import credits
from malerei.serve.accounts.tokens import new_id
from malerei.serve.context import Services
from malerei.serve.db.models import IdempotencyKey, Image, Job, User
from malerei.serve.errors import ApiError
from malerei.serve.jobs.batching import batch_key
from malerei.serve.jobs.changes import announce
from malerei.serve.jobs.queue import ACTIVE, finish
from malerei.serve.jobs.spec import DIFFUSION_KINDS, IMAGE_FIELDS, Outpaint
from malerei.serve.ratelimit import retry_after_header
from malerei.serve.storage import encode_png
from malerei.serve.uploads import decode_b64, decode_image

IDEMPOTENCY_TTL_S = 24 * 3600


# ----------------------------------------------------------------------------- resolving
def _check_size(services: Services, width: int, height: int) -> None:
    s = services.settings
    if width > s.max_width or height > s.max_height or width * height > s.max_pixels:
        raise ApiError(422, "size_out_of_range",
                       f"{width}x{height} is too large: at most {s.max_width}x{s.max_height} and "
                       f"{s.max_pixels} pixels per image are allowed")
    if width < 8 or height < 8:
        raise ApiError(422, "size_out_of_range", f"{width}x{height} is too small: at least 8x8")


def _decode_inputs(services: Services, spec: Any) -> dict[str, Any]:
    s = services.settings
    images = {}
    for name in IMAGE_FIELDS:
        value = getattr(spec, name, None)
        if value is None:
            continue
        data = decode_b64(value, max_bytes=s.max_upload_bytes, what=name)
        images[name] = decode_image(data, max_bytes=s.max_upload_bytes, max_pixels=s.max_input_pixels, what=name)
    return images


def resolve(services: Services, spec: Any) -> tuple[str, dict[str, Any], dict[str, Any], int]:
    """(model name, concrete params, decoded input images, number of output images)."""
    s = services.settings
    info = services.catalog.resolve(spec.model)
    d = info.defaults
    images = _decode_inputs(services, spec)
    fields = spec.model_dump(exclude={"kind", "model", "webhook_url", *IMAGE_FIELDS})
    if spec.kind in DIFFUSION_KINDS:
        init = images.get("init_image")
        if spec.kind == "txt2img" or init is None:
            width, height = spec.width or d["width"], spec.height or d["height"]
        elif isinstance(spec, Outpaint):
            width = spec.width or (init.width // 8 * 8 + spec.left + spec.right)
            height = spec.height or (init.height // 8 * 8 + spec.top + spec.bottom)
        else:
            width, height = spec.width or max(8, init.width // 8 * 8), spec.height or max(8, init.height // 8 * 8)
        _check_size(services, width, height)
        steps = spec.steps or d["steps"]
        if steps > s.max_steps:
            raise ApiError(422, "steps_out_of_range", f"steps={steps} is too many: at most {s.max_steps}")
        if spec.batch_size > s.max_batch:
            raise ApiError(422, "batch_out_of_range",
                           f"batch_size={spec.batch_size} is too large: at most {s.max_batch}")
        sampler = services.catalog.check_sampler(spec.sampler or d["sampler"])
        scheduler = services.catalog.check_scheduler(spec.scheduler or d.get("scheduler", "Automatic"))
        seed = spec.seed if spec.seed >= 0 else secrets.randbelow(2**32)
        fields.update(width=width, height=height, steps=steps, sampler=sampler, scheduler=scheduler, seed=seed,
                      cfg_scale=spec.cfg_scale if spec.cfg_scale is not None else d["cfg_scale"])
        if spec.kind == "inpaint" and images["mask_image"].size != images["init_image"].size:
            raise ApiError(422, "mask_size_mismatch",
                           f"mask_image is {images['mask_image'].width}x{images['mask_image'].height} but "
                           f"init_image is {images['init_image'].width}x{images['init_image'].height}; they must match")
        n_images = spec.batch_size
    else:
        source = images["image"]
        scale = getattr(spec, "scale", 1)
        tool = "upscaler" if spec.kind == "upscale" else "restorer"
        fields[tool] = services.catalog.resolve_tool(tool, getattr(spec, tool))
        width, height = source.width * scale, source.height * scale
        if width * height > s.max_pixels * 16:
            raise ApiError(422, "size_out_of_range",
                           f"the result would be {width}x{height}, more than {s.max_pixels * 16} pixels")
        fields.update(width=width, height=height, steps=1)
        n_images = 1
    return info.name, fields, images, n_images


# ----------------------------------------------------------------------------- submitting
def submit(services: Services, *, user_id: int, api_key_id: str | None, spec: Any) -> Job:
    s = services.settings
    model, params, images, n_images = resolve(services, spec)
    cost = credits.job_cost(images=n_images, width=params["width"], height=params["height"],
                            steps=params["steps"], unit=s.credit_unit)
    job_id = new_id("job")
    inputs = {}
    for name, image in images.items():
        rel = f"{job_id}/{name}.png"
        services.inputs.write(rel, encode_png(image))
        inputs[name] = rel
    params["inputs"] = inputs
    try:
        with services.db.write() as session:
            # the user's row lock orders this user's submissions (SQLite's BEGIN IMMEDIATE already
            # does), so the queue cap below is exact on PostgreSQL too
            session.execute(select(User.id).where(User.id == user_id).with_for_update())
            active = session.scalar(select(func.count()).select_from(Job)
                                    .where(Job.user_id == user_id, Job.status.in_(ACTIVE))) or 0
            if active >= s.max_queued_per_user:
                raise ApiError(429, "too_many_queued_jobs",
                               f"you have {active} jobs queued or running; at most {s.max_queued_per_user} "
                               "are allowed: wait for some to finish", headers=retry_after_header(2))
            if s.credits_enabled and s.auth:
                try:
                    credits.charge(session, user_id, job_id, cost)
                except credits.InsufficientCredits as exc:
                    raise ApiError(402, "insufficient_credits", str(exc)) from None
            job = Job(id=job_id, user_id=user_id, api_key_id=api_key_id, kind=spec.kind, model=model,
                      params=params, batch_key=batch_key(job_id=job_id, kind=spec.kind, model=model, params=params),
                      n_images=n_images, cost=cost, status="queued", attempts=0, cancel_requested=False,
                      created_at=time.time(), progress_step=0, progress_total=params["steps"],
                      webhook_url=spec.webhook_url, webhook_status="none", webhook_attempts=0)
            session.add(job)
    except BaseException:
        services.inputs.delete_job(job_id)
        raise
    services.queue.notify(job)
    return job


def request_hash(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def idempotent(services: Services, *, user_id: int, key: str | None, body_hash: str,
               run: Callable[[], tuple[int, dict[str, Any]]]) -> tuple[int, dict[str, Any]]:
    """Stripe's Idempotency-Key: the first answer for (user, key) is kept and replayed for the
    same body; a different body is 422; a request arriving while the first is still being
    accepted is 409. Answers are kept for 24 hours."""
    if key is None:
        return run()
    if not (1 <= len(key) <= 255):
        raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key must be 1 to 255 characters")
    now = time.time()
    try:
        replay = _claim_key(services, user_id=user_id, key=key, body_hash=body_hash, now=now)
    except IntegrityError:  # another request inserted the key first (databases without BEGIN IMMEDIATE)
        raise ApiError(409, "idempotency_key_in_use",
                       "a request with this Idempotency-Key is still being processed; retry later") from None
    if replay is not None:
        return replay
    try:
        status, body = run()
    except ApiError as exc:
        if exc.status in (409, 429) or exc.status >= 500:  # transient: let the client retry the key
            _forget(services, user_id, key)
        else:
            _remember(services, user_id, key, exc.status, {"error": {"code": exc.code, "message": exc.message}})
        raise
    except BaseException:
        _forget(services, user_id, key)
        raise
    _remember(services, user_id, key, status, body)
    return status, body


def _claim_key(services: Services, *, user_id: int, key: str, body_hash: str,
               now: float) -> tuple[int, dict[str, Any]] | None:
    """Record (user, key) as pending, or return the answer kept for it; 422/409 as Stripe does."""
    with services.db.write() as session:
        row = session.get(IdempotencyKey, (user_id, key))
        if row is not None and row.created_at < now - IDEMPOTENCY_TTL_S:
            session.delete(row)
            session.flush()
            row = None
        if row is None:
            session.add(IdempotencyKey(user_id=user_id, key=key, request_hash=body_hash, state="pending",
                                       created_at=now))
        elif row.request_hash != body_hash:
            raise ApiError(422, "idempotency_key_reused",
                           "this Idempotency-Key was used with a different request body; use a new key")
        elif row.state == "pending":
            raise ApiError(409, "idempotency_key_in_use",
                           "a request with this Idempotency-Key is still being processed; retry later")
        else:
            return row.status_code or 200, row.response or {}
    return None


def _remember(services: Services, user_id: int, key: str, status: int, body: dict[str, Any]) -> None:
    with services.db.write() as session:
        row = session.get(IdempotencyKey, (user_id, key))
        if row is not None:
            row.state, row.status_code, row.response = "done", status, body


def _forget(services: Services, user_id: int, key: str) -> None:
    with services.db.write() as session:
        row = session.get(IdempotencyKey, (user_id, key))
        if row is not None:
            session.delete(row)


# ----------------------------------------------------------------------------- cancelling
def cancel(services: Services, job_id: str) -> Job:
    """Cancel a queued job at once (refunded); ask the worker to stop a running one."""
    with services.db.write() as session:
        job = session.get(Job, job_id, with_for_update=True)  # not claimed or finished meanwhile
        if job.status == "queued":
            finish(session, job, "cancelled", code="cancelled", message="cancelled by the user")
        elif job.status == "running":
            job.cancel_requested = True
            announce(session, [job.id])  # other servers' streams of this job read it again
        session.flush()
        session.expunge(job)
    services.changes.changed([job.id])  # its event streams here hear of it now (committed above)
    return job


# ----------------------------------------------------------------------------- views
def image_url(image_id: str) -> str:
    return f"/v1/images/{image_id}/file"


def job_public(job: Job, images: list[Image]) -> dict[str, Any]:
    params = {k: v for k, v in job.params.items() if k != "inputs"}
    return {
        "id": job.id,
        "object": "job",
        "kind": job.kind,
        "status": job.status,
        "model": job.model,
        "params": params,
        "cost": job.cost,
        "attempts": job.attempts,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "progress": {"step": job.progress_step, "total": job.progress_total},
        "cancel_requested": job.cancel_requested,
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "images": [image_public(image) for image in sorted(images, key=lambda i: i.index)],
        "webhook": {"url": job.webhook_url, "status": job.webhook_status,
                    "attempts": job.webhook_attempts} if job.webhook_url else None,
    }


def image_public(image: Image) -> dict[str, Any]:
    return {"id": image.id, "job_id": image.job_id, "index": image.index, "seed": image.seed,
            "width": image.width, "height": image.height, "prompt": image.prompt,
            "infotext": image.infotext, "created_at": image.created_at, "url": image_url(image.id)}


def load_job_view(services: Services, job_id: str) -> dict[str, Any]:
    with services.db.read() as session:
        job = session.get(Job, job_id)
        images = session.scalars(select(Image).where(Image.job_id == job_id)).all()
        return job_public(job, list(images))
