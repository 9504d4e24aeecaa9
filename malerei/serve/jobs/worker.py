"""The worker: claims compatible jobs, runs them through the engine, stores results.

It runs as a thread inside ``malerei serve`` or as its own process (``malerei worker``); any
number may share one database. A heartbeat thread extends the leases of the jobs in hand; if the
process dies (even ``kill -9``) the leases run out and another worker runs the jobs again.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence

from PIL import Image as PILImage

from malerei.serve.accounts.tokens import new_id
from malerei.serve.context import Services
from malerei.serve.db.models import Job
from malerei.serve.jobs.engine import Engine, EngineRequest, EngineResult
from malerei.serve.jobs.queue import StoredImage
from malerei.serve.jobs.webhooks import WebhookSender
from malerei.serve.storage import encode_png

log = logging.getLogger("malerei.serve.worker")


def _preview_png(image: PILImage.Image | None) -> bytes | None:
    if image is None:
        return None
    out = io.BytesIO()
    image.convert("RGB").save(out, format="PNG")
    return out.getvalue()


class _Heartbeat:
    """Extends the leases of the jobs in hand every third of the lease time."""

    def __init__(self, services: Services, worker_id: str, job_ids: Sequence[str]) -> None:
        self.services = services
        self.worker_id = worker_id
        self.job_ids = list(job_ids)
        self.lost: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="malerei-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        lease = self.services.settings.lease_s
        while not self._stop.wait(lease / 3):
            try:
                held = self.services.queue.extend(self.worker_id, self.job_ids, lease)
                self.lost = set(self.job_ids) - held
            except Exception:  # noqa: BLE001 - a failed beat is retried; the lease has slack
                log.warning("heartbeat failed", exc_info=True)


class Worker:
    def __init__(self, services: Services, engine: Engine, *, worker_id: str | None = None) -> None:
        self.services = services
        self.engine = engine
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{new_id('w', 6)}"
        self.webhooks = WebhookSender(services)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_batch_end = 0.0  # the batch window counts from here too (queue.wait_for_company)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="malerei-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.services.queue.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_forever(self) -> None:
        log.info("worker %s started", self.worker_id)
        warm = getattr(self.engine, "warm", None)
        if warm is not None:
            warm(None)
            log.info("worker %s ready", self.worker_id)
        hooks = threading.Thread(target=self._webhook_loop, name="malerei-webhooks", daemon=True)
        hooks.start()
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception:  # noqa: BLE001 - keep serving; the jobs' leases make this safe
                log.exception("worker loop error")
                worked = False
                self._stop.wait(1.0)
            if not worked:
                self.services.queue.wait(self.services.settings.poll_s)
        hooks.join(5)
        log.info("worker %s stopped", self.worker_id)

    def _webhook_loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.webhooks.deliver_due()
            except Exception:  # noqa: BLE001 - retried on the next round
                log.exception("webhook delivery error")

    # ------------------------------------------------------------------ one batch
    def run_once(self) -> bool:
        s = self.services.settings
        jobs = self.services.queue.claim(self.worker_id, max_jobs=s.batch_max, lease_s=s.lease_s,
                                         window_s=s.batch_window_s, since=self._last_batch_end)
        if not jobs:
            return False
        log.info("running %d job(s): %s", len(jobs), ", ".join(j.id for j in jobs))
        with _Heartbeat(self.services, self.worker_id, [j.id for j in jobs]):
            self._run(jobs)
        self._last_batch_end = time.time()
        return True

    def _requests(self, jobs: Sequence[Job]) -> list[EngineRequest]:
        requests = []
        for job in jobs:
            params = {k: v for k, v in job.params.items() if k != "inputs"}
            images = {}
            for name, rel in job.params.get("inputs", {}).items():
                with PILImage.open(io.BytesIO(self.services.inputs.read(rel)), formats=["PNG"]) as img:
                    images[name] = img.copy()
            requests.append(EngineRequest(job_id=job.id, kind=job.kind, model=job.model, params=params, images=images))
        return requests

    def _run(self, jobs: Sequence[Job]) -> None:
        from malerei.engine.errors import Cancelled, MalereiError

        queue = self.services.queue
        ids = [j.id for j in jobs]
        last_write = 0.0
        last_preview = 0.0
        done_steps = [0, 0]  # step, total: the last step finished, recorded when a job is cancelled

        def on_progress(step: int, total: int, preview: PILImage.Image | None) -> None:
            nonlocal last_write, last_preview
            done_steps[:] = [step, total]
            now = time.monotonic()
            want_preview = preview is not None and now - last_preview >= self.services.settings.preview_every_s
            if step < total and now - last_write < 0.1 and not want_preview:
                return
            last_write = now
            if want_preview:
                last_preview = now
            queue.report_progress(self.worker_id, ids, step, total, _preview_png(preview) if want_preview else None)
            self.services.changes.changed(ids)

        def is_cancelled() -> bool:
            return bool(queue.cancel_requested(ids))

        try:
            results = self.engine.run_batch(self._requests(jobs), on_progress, is_cancelled)
        except Cancelled:
            stopped = queue.cancel_requested(ids)
            queue.report_progress(self.worker_id, ids, done_steps[0], done_steps[1] or jobs[0].progress_total, None)
            for job_id in ids:
                if job_id in stopped:
                    queue.cancel_running(self.worker_id, job_id)
                else:
                    queue.release(self.worker_id, job_id)
            self.services.changes.changed(ids)
            return
        except MalereiError as exc:
            results = [EngineResult(job_id=i, error_code="invalid_parameter", error_message=str(exc)) for i in ids]
        except Exception as exc:  # noqa: BLE001 - the job fails with the reason; the worker lives on
            log.exception("engine error on %s", ids)
            results = [EngineResult(job_id=i, error_code="engine_error",
                                    error_message=f"the engine failed: {type(exc).__name__}: {exc}") for i in ids]
        by_id = {r.job_id: r for r in results}
        for job_id in ids:
            result = by_id.get(job_id) or EngineResult(job_id=job_id, error_code="engine_error",
                                                       error_message="the engine returned no result for this job")
            self._store(result)
            self.services.changes.changed([job_id])  # each client hears at once, so it can submit again soon

    def _store(self, result: EngineResult) -> None:
        queue = self.services.queue
        if not result.ok:
            queue.fail(self.worker_id, result.job_id, result.error_code or "error", result.error_message or "failed")
            return
        stored = [StoredImage(id=new_id("img"), index=i, png=encode_png(img.image, infotext=img.infotext,
                                                                        recipe=img.recipe),
                              width=img.image.width, height=img.image.height, seed=int(img.seed),
                              infotext=img.infotext, recipe=img.recipe)
                  for i, img in enumerate(result.images)]
        images = self.services.images
        if not queue.complete(self.worker_id, result.job_id, stored, images.write, images.result_path):
            log.warning("job %s was taken from this worker (lease lost); its result is dropped", result.job_id)
