"""Native jobs API: submit (202), get, list, stream progress (SSE), cancel."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select

from malerei.serve.api.deps import CurrentUser, OwnedJob, ServicesDep
from malerei.serve.api.schemas import JobList, JobPublic
from malerei.serve.db.models import Image, Job
from malerei.serve.errors import error_responses
from malerei.serve.jobs import service
from malerei.serve.jobs.queue import FINISHED
from malerei.serve.jobs.spec import JobSpec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=202, response_model=JobPublic,
             responses=error_responses(400, 401, 402, 409, 413, 415, 422, 429))
def create_job(services: ServicesDep, identity: CurrentUser, spec: Annotated[JobSpec, Body()],
               idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> JSONResponse:
    """Queue a txt2img, img2img, inpaint, outpaint, upscale or restore job; answers 202 at once.

    With an ``Idempotency-Key`` header the same key and body give the same job."""

    def run() -> tuple[int, dict[str, Any]]:
        job = service.submit(services, user_id=identity.user.id, api_key_id=identity.api_key_id, spec=spec)
        return 202, service.job_public(job, [])

    body_hash = service.request_hash(spec.model_dump(mode="json"))
    status, body = service.idempotent(services, user_id=identity.user.id, key=idempotency_key,
                                      body_hash=body_hash, run=run)
    return JSONResponse(body, status_code=status, headers={"Location": f"/v1/jobs/{body.get('id', '')}"})


@router.get("", response_model=JobList, responses=error_responses(401, 422, 429))
def list_jobs(services: ServicesDep, identity: CurrentUser,
              status: Annotated[str | None, Query(pattern="^(queued|running|succeeded|failed|cancelled)$")] = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
    with services.db.read() as session:
        query = select(Job).where(Job.user_id == identity.user.id)
        if status:
            query = query.where(Job.status == status)
        jobs = session.scalars(query.order_by(Job.created_at.desc()).limit(limit)).all()
        images = session.scalars(select(Image).where(Image.job_id.in_([j.id for j in jobs]))).all()
    by_job: dict[str, list[Image]] = {}
    for image in images:
        by_job.setdefault(image.job_id, []).append(image)
    return {"jobs": [service.job_public(job, by_job.get(job.id, [])) for job in jobs]}


@router.get("/{job_id}", response_model=JobPublic, responses=error_responses(401, 404, 429))
def get_job(services: ServicesDep, job: OwnedJob) -> dict[str, Any]:
    return service.load_job_view(services, job.id)


@router.delete("/{job_id}", response_model=JobPublic, responses=error_responses(401, 404, 429))
def cancel_job(services: ServicesDep, job: OwnedJob) -> dict[str, Any]:
    """Cancel: a queued job at once, a running one within one step. Cancelled jobs are refunded."""
    service.cancel(services, job.id)
    return service.load_job_view(services, job.id)


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@router.get("/{job_id}/events", responses={200: {"content": {"text/event-stream": {}},
                                                  "description": "server-sent events"},
                                            **error_responses(401, 404, 429)})
async def job_events(request: Request, services: ServicesDep, job: OwnedJob) -> StreamingResponse:
    """Server-sent events: ``state`` on every change of state, ``progress`` with step, total and a
    low-resolution ``preview`` (PNG data URL) while running, and a final ``done`` with the job."""

    def snapshot() -> tuple[str, int, int, bytes | None, str | None]:
        with services.db.read() as session:
            row = session.execute(select(Job.status, Job.progress_step, Job.progress_total, Job.preview_png,
                                         Job.lease_owner).where(Job.id == job.id)).one()
            return row.status, row.progress_step, row.progress_total, row.preview_png, row.lease_owner

    # A change wakes the stream at once (JobChanges) when this process's worker made it or, on
    # PostgreSQL, when any worker did (NOTIFY); then the poll is only a safety net. SQLite has no
    # signal from workers in other processes (`malerei worker` beside an embedded server): a job
    # one of them runs is polled fast, a queued one (whoever will claim it) every half second.
    local_worker = getattr(request.app.state, "worker", None)
    local_id = local_worker.worker_id if local_worker is not None else None

    def poll_s(status: str, owner: str | None) -> float:
        if services.db.is_postgresql or (status == "running" and local_id is not None and owner == local_id):
            return 1.0
        return 0.1 if status == "running" else 0.5

    async def stream() -> AsyncIterator[str]:
        with services.changes.listen(job.id) as changes:
            async for event in events(changes):
                yield event

    async def events(changes) -> AsyncIterator[str]:
        last: tuple[Any, ...] = (None, -1, None)
        started = time.monotonic()
        while True:
            status, step, total, preview, owner = await run_in_threadpool(snapshot)
            if status != last[0]:
                yield _event("state", {"status": status})
            if (step, preview) != (last[1], last[2]) and status == "running":
                data: dict[str, Any] = {"step": step, "total": total}
                if preview is not None and preview != last[2]:
                    data["preview"] = "data:image/png;base64," + base64.b64encode(preview).decode()
                yield _event("progress", data)
            last = (status, step, preview)
            if status in FINISHED:
                yield _event("done", await run_in_threadpool(service.load_job_view, services, job.id))
                return
            if await request.is_disconnected():
                return
            if time.monotonic() - started >= 10:
                started = time.monotonic()
                yield ": keep-alive\n\n"
            await changes.wait(poll_s(status, owner))

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
