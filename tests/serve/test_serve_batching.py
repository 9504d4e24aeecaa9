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
