"""Several txt2img jobs in one UNet call per step.

``generate_many`` is the engine's ``run_job`` body (steps 2-6 of ``malerei.engine.pipeline``)
widened from one job to several: the prompts of all jobs are encoded row by row, every image
keeps its own noise stream (so each image equals what ``generate`` makes for its job alone, up
to float rounding of the wider matrix products), and classifier-free guidance uses one scale per
row. Jobs must agree on what shapes the loop: model, size, sampler, schedule, steps, clip skip
and guidance rescale (the worker's batch key). Jobs with LoRA tags change the model and
embedding users need their own recipe records, so those run one by one through ``run_job``.

The service's worker batches compatible queued jobs with it, and ``malerei eval`` generates its
prompt list with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SHARED = ("sampler", "scheduler", "steps", "width", "height", "clip_skip", "guidance_rescale")


def generate_many(model: Any, params: Sequence[Any], *, progress: Callable | None = None,
                  cancel: Callable[[], bool] | None = None, preview_every: int = 1,
                  models_dir: Path | None = None) -> list[list[Any]]:
    """One list of ``GeneratedImage`` per entry of ``params`` (``GenerationParams``)."""
    import torch

    from malerei.engine import noise, samplers
    from malerei.engine import pipeline as P
    from malerei.engine.errors import Cancelled
    from malerei.engine.prompts import encode_prompts

    # 1. Check inputs
    jobs = [P.resolve_params(model, p) for p in params]
    texts = [P._loras_and_texts(job) for job in jobs]
    alike = all(getattr(job, name) == getattr(jobs[0], name) for job in jobs for name in SHARED)

    def one_by_one() -> list[list[Any]]:
        return [P.run_job(model, job, progress=progress, cancel=cancel, preview_every=preview_every,
                          models_dir=models_dir) for job in jobs]

    if len(jobs) == 1 or not alike or any(loras for _, _, loras in texts):
        return one_by_one()
    first = jobs[0]
    pipe = model.pipe
    device = pipe._execution_device
    dtype = pipe.unet.dtype
    folder = P._models_dir(model, models_dir)
    if cancel is not None and cancel():
        raise Cancelled("generation cancelled")

    def on_step(i: int, total: int, x: Any, denoised: Any) -> None:
        if progress is None:
            return
        show = preview_every and ((i + 1) % preview_every == 0 or i + 1 == total)
        progress(i + 1, total, (denoised if denoised is not None else x) if show else None)

    with torch.inference_mode(), P.hold_model(model, mutates=P.needs_vae_upcast(pipe)):
        # 2. Encode prompts: row r belongs to image r of the concatenated batches
        tokenizers, encoders = P._text_components(pipe, model.family)
        embeds = encode_prompts(
            tokenizers=tokenizers, text_encoders=encoders, family=model.family,
            prompts=[prompt for job, (prompt, _, _) in zip(jobs, texts) for _ in range(job.batch_size)],
            negative_prompts=[neg for job, (_, neg, _) in zip(jobs, texts) for _ in range(job.batch_size)],
            clip_skip=first.clip_skip, embeddings=P._embeddings(model, folder), device=device)
        if embeds.used_embeddings:
            return one_by_one()
        scales = [job.cfg_scale for job in jobs for _ in range(job.batch_size)]
        do_cfg = any(scale != 1.0 for scale in scales)
        time_ids = P.sdxl_time_ids(first.width, first.height) if model.family == "sdxl" else None
        model_fn = P.GuidedUNet(pipe.unet, embeds, cfg_scale=2.0 if do_cfg else 1.0,
                                guidance_rescale=first.guidance_rescale, time_ids=time_ids)
        if do_cfg:  # one guidance scale per row: uncond + scale * (cond - uncond)
            model_fn.cfg_scale = torch.tensor(scales, device=device, dtype=dtype).view(-1, 1, 1, 1)

        # 3. Noise: each job's own streams, side by side
        factor = P.vae_scale_factor(pipe)
        shape = (pipe.unet.config.in_channels, first.height // factor, first.width // factor)
        streams = [noise.ImageNoise.for_batch(job.seed, job.batch_size, subseed=job.subseed,
                                              subseed_strength=job.subseed_strength) for job in jobs]
        start = torch.cat([s.initial(shape, device=device, dtype=embeds.cond.dtype) for s in streams])

        # 4. Sample
        latents = samplers.sample(
            sampler=first.sampler, schedule=first.scheduler, steps=first.steps,
            scheduler_config=dict(pipe.scheduler.config), model_fn=model_fn, noise=start,
            generators=[g for s in streams for g in s.generators], callback=on_step, cancel=cancel,
            model_family=model.family)

        # 5. Decode
        images = P.to_pil(P.decode(pipe, latents))

    # 6. Images, infotext, recipe, per job
    results, row = [], 0
    for job in jobs:
        own_images = []
        for i in range(job.batch_size):
            own = job.for_image(i)
            recipe = P.build_recipe(model, job, i, device=device, dtype=dtype, kind="txt2img")
            own_images.append(P.GeneratedImage(image=images[row], seed=own.seed, recipe=recipe,
                                               infotext=P.format_infotext(model, own)))
            row += 1
        results.append(own_images)
    return results
