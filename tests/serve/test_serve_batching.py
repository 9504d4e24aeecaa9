"""Batching: compatible jobs share one UNet call per step and still get their own images."""

from __future__ import annotations

import time

import numpy as np

from malerei.serve.config import Settings
from malerei.serve.context import build_services
from malerei.serve.db.models import Job
from malerei.serve.jobs.batching import batch_key


def test_generate_many_equals_one_by_one_with_one_unet_call_per_step(tiny_sd1):
    from malerei.engine.loading import load_model
    from malerei.engine.pipeline import GenerationParams, generate
    from malerei.engine.batch import generate_many

    model = load_model(tiny_sd1.folder)
    common = dict(width=64, height=64, steps=3, sampler="Euler a")
    params = [GenerationParams(prompt="a red circle", seed=1, cfg_scale=7.0, **common),
              GenerationParams(prompt="a blue square", negative_prompt="green", seed=2, cfg_scale=3.0,
                               batch_size=2, **common),
              GenerationParams(prompt="a small triangle", seed=3, cfg_scale=5.0, subseed=9, subseed_strength=0.3,
                               **common)]
    calls = []
    unet = model.pipe.unet
    original = unet.forward

    def counting(sample, *args, **kwargs):
        calls.append(sample.shape[0])
        return original(sample, *args, **kwargs)

    unet.forward = counting
    try:
        batched = generate_many(model, params)
        batched_calls = list(calls)
        calls.clear()
        alone = [generate(model, p) for p in params]
    finally:
        unet.forward = original
    assert batched_calls == [8] * 3  # 4 images, [uncond; cond], one call per step
    assert len(calls) == 9
    for together, single in zip(batched, alone):
        assert [g.seed for g in together] == [g.seed for g in single]
        for a, b in zip(together, single):
            assert a.infotext == b.infotext
            assert a.recipe == b.recipe
            diff = np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int))
            assert diff.max() <= 2, diff.max()


def test_claim_takes_the_oldest_job_and_its_compatible_company(tmp_path):
    services = build_services(Settings(data_dir=tmp_path))
    from malerei.serve.accounts.users import create_user

    with services.db.write() as s:
        user = create_user(s, "u")
        now = time.time()
        for i, (size, steps) in enumerate([(64, 4), (64, 4), (128, 4), (64, 8), (64, 4)]):
            params = {"width": size, "height": size, "sampler": "Euler", "scheduler": "Automatic", "steps": steps,
                      "prompt": f"p{i}"}
            s.add(Job(id=f"job_{i}", user_id=user.id, kind="txt2img", model="m", params=params,
                      batch_key=batch_key(job_id=f"job_{i}", kind="txt2img", model="m", params=params), n_images=1,
                      cost=1, status="queued", attempts=0, cancel_requested=False, created_at=now + i,
                      progress_step=0, progress_total=steps, webhook_status="none", webhook_attempts=0))
    first = services.queue.claim("w1", max_jobs=8, lease_s=10)
    assert [j.id for j in first] == ["job_0", "job_1", "job_4"]
    assert all(j.status == "running" and j.lease_owner == "w1" and j.attempts == 1 for j in first)
    assert [j.id for j in services.queue.claim("w2", max_jobs=8, lease_s=10)] == ["job_2"]
    assert [j.id for j in services.queue.claim("w2", max_jobs=1, lease_s=10)] == ["job_3"]
    assert services.queue.claim("w3", max_jobs=8, lease_s=10) == []
    # a lease that runs out puts the job back; the holder can no longer finish it
    with services.db.write() as s:
        s.get(Job, "job_2").lease_expires_at = time.time() - 1
    again = services.queue.claim("w3", max_jobs=8, lease_s=10)
    assert [(j.id, j.attempts) for j in again] == [("job_2", 2)]
    assert not services.queue.fail("w2", "job_2", "x", "stale worker")
    assert services.queue.fail("w3", "job_2", "x", "current worker")


def _queue_job(services, user_id: str, job_id: str, created_at: float) -> None:
    params = {"width": 64, "height": 64, "sampler": "Euler", "scheduler": "Automatic", "steps": 4, "prompt": job_id}
    with services.db.write() as s:
        s.add(Job(id=job_id, user_id=user_id, kind="txt2img", model="m", params=params,
                  batch_key=batch_key(job_id=job_id, kind="txt2img", model="m", params=params), n_images=1,
                  cost=1, status="queued", attempts=0, cancel_requested=False, created_at=created_at,
                  progress_step=0, progress_total=4, webhook_status="none", webhook_attempts=0))


def test_the_batch_window_also_counts_from_the_workers_last_batch(tmp_path):
    """Under steady load the queued jobs are old when a batch ends, and the clients of the batch
    just finished submit again a moment later: the window counts from the end of the worker's last
    batch too, so they join; it ends early once the batch is full; with an old job and no recent
    batch the claim does not wait."""
    import threading

    from malerei.serve.accounts.users import create_user

    services = build_services(Settings(data_dir=tmp_path))
    with services.db.write() as s:
        user_id = create_user(s, "u").id
    _queue_job(services, user_id, "job_old", time.time() - 10)
    late = threading.Timer(0.2, lambda: _queue_job(services, user_id, "job_late", time.time()))
    late.start()
    started = time.monotonic()
    claimed = services.queue.claim("w", max_jobs=2, lease_s=10, window_s=1.5, since=time.time())
    waited = time.monotonic() - started
    late.join()
    assert [j.id for j in claimed] == ["job_old", "job_late"]
    assert 0.15 < waited < 1.2  # joined by the late job, and no longer waited once the batch was full

    _queue_job(services, user_id, "job_old2", time.time() - 10)
    started = time.monotonic()
    assert [j.id for j in services.queue.claim("w", max_jobs=8, lease_s=10, window_s=1.5)] == ["job_old2"]
    assert time.monotonic() - started < 1.0


def test_the_batch_window_waits_on_while_company_keeps_arriving():
    """Jobs that arrive one after another, each within a window of the last, all join one batch
    even when the last comes after the first window has passed; the wait stops at four windows."""
    from malerei.serve.jobs.queue import COMPANY_WAIT_WINDOWS, wait_for_company

    arrivals: list[float] = []
    start = time.time()

    def count() -> int:  # one job queued at start, one more every 0.2 s
        return 1 + int((time.time() - start) / 0.2)

    wait_for_company(lambda: arrivals.append(count()) or arrivals[-1], oldest=start, since=0.0, window_s=0.3,
                     max_jobs=4)
    waited = time.time() - start
    assert arrivals[-1] == 4 and 0.55 < waited < 0.9  # the fourth came at 0.6 s, after the first window

    start = time.time()
    wait_for_company(count, oldest=start, since=0.0, window_s=0.3, max_jobs=100)  # company never stops coming
    assert COMPANY_WAIT_WINDOWS * 0.3 - 0.05 < time.time() - start < COMPANY_WAIT_WINDOWS * 0.3 + 0.3

    start = time.time()
    wait_for_company(lambda: 1, oldest=start, since=0.0, window_s=0.3, max_jobs=4)  # nobody comes: one window
    assert 0.25 < time.time() - start < 0.45


def test_job_changes_wake_a_listening_stream_from_another_thread():
    import asyncio
    import threading

    from malerei.serve.jobs.changes import JobChanges

    changes = JobChanges()

    async def scenario() -> tuple[bool, bool, float]:
        with changes.listen() as listener:
            quiet = await listener.wait(0.05)  # nothing changed: times out
            threading.Timer(0.05, changes.changed).start()
            started = time.monotonic()
            woken = await listener.wait(5.0)
            return quiet, woken, time.monotonic() - started

    quiet, woken, waited = asyncio.run(scenario())
    assert (quiet, woken) == (False, True) and waited < 2.0
    changes.changed()  # no listener left: nothing to wake, no error


def test_a_stream_of_one_job_is_woken_by_that_job_only():
    import asyncio

    from malerei.serve.jobs.changes import JobChanges

    changes = JobChanges()

    async def scenario() -> list[bool]:
        with changes.listen("job_a") as listener:
            heard = []
            for ids in (["job_b", "job_c"], ["job_c", "job_a"], None, []):
                changes.changed(ids)
                heard.append(await listener.wait(0.05))
            return heard

    assert asyncio.run(scenario()) == [False, True, True, False]


def test_the_worker_runs_models_in_the_configured_precision(tmp_path, tiny_models_dir):
    """`--set dtype=bf16` reaches the engine: the worker's model is loaded in bf16 and a batch of
    jobs still gives each its image; an unknown precision is refused when the server starts."""
    import pytest
    import torch

    from malerei.serve.app import make_engine
    from malerei.serve.config import ConfigError, parse_overrides
    from malerei.serve.jobs.engine import EngineRequest

    settings = Settings(data_dir=tmp_path, models_dir=tiny_models_dir, **parse_overrides(["dtype=bf16"]))
    engine = make_engine(settings)
    params = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 2, "sampler": "Euler",
              "scheduler": "Automatic", "seed": 1}
    requests = [EngineRequest(job_id=f"job_{i}", kind="txt2img", model="tiny-sd1", params={**params, "seed": i},
                              images={}) for i in range(2)]
    results = engine.run_batch(requests, lambda *a: None, lambda: False)
    assert [len(r.images) for r in results] == [1, 1] and all(r.ok for r in results)
    assert engine._model("tiny-sd1").pipe.unet.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="fp8"):
        Settings(data_dir=tmp_path, **parse_overrides(["dtype=fp8"]))
