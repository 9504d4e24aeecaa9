"""The denoising loop for diffusers schedulers: exactly ``StableDiffusionPipeline.__call__``'s.

Steps 4, 5 and 7 of the stock pipeline (diffusers 0.3x-0.4x): ``set_timesteps(steps, device)``,
latents = noise * ``init_noise_sigma``, and per timestep ``scale_model_input`` -> model ->
``step(out, t, latents, **extra_step_kwargs)``, where extra_step_kwargs holds ``eta`` and
``generator`` when the scheduler's ``step`` takes them. So a sampler here gives the same
latents as a stock pipeline with ``pipe.scheduler = make_scheduler(...)``.

One deliberate difference: samplers marked ``v_as_eps`` (PLMS) get the model output converted
from v to eps on v-prediction models, since diffusers' PNDM extrapolates raw v.

img2img follows ``StableDiffusionImg2ImgPipeline`` (skip the first timesteps, ``set_begin_index``,
``add_noise`` the init latents to the first kept timestep), with A1111's step count.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from .hooks import NoiseLevel
from .registry import SamplerInfo, diffusers_overrides


def make_scheduler(info: SamplerInfo, schedule: str | None, scheduler_config: dict,
                   generators: Sequence[torch.Generator] = ()):
    """A fresh scheduler for one job (never share one: diffusers schedulers keep run state)."""
    import diffusers

    cls = getattr(diffusers, info.implementation)
    overrides = diffusers_overrides(info, schedule)
    if _feeds_eps(info, scheduler_config):
        overrides["prediction_type"] = "epsilon"
    if info.implementation == "DPMSolverSDEScheduler" and generators:
        # One Brownian tree per image, seeded like A1111 does: with that image's seed.
        overrides["noise_sampler_seed"] = [g.initial_seed() for g in generators]
    if "clip_sample" in cls._get_init_keys(cls):
        # A1111 never clips x0; diffusers' Stable Diffusion pipelines switch it off too, but a
        # config that omits the key would get DDIM's default (True).
        overrides.setdefault("clip_sample", False)
    return cls.from_config(dict(scheduler_config), **overrides)


def _feeds_eps(info: SamplerInfo, scheduler_config: dict) -> bool:
    return info.v_as_eps and scheduler_config.get("prediction_type") == "v_prediction"


def _v_to_eps(scheduler, model_fn):
    """model_fn returning eps for a v-prediction model on VP latents z at integer timestep t:
    eps = sqrt(a_t) v + sqrt(1 - a_t) z (Salimans & Ho 2022, sec. 4)."""

    def eps_fn(z, t):
        a = scheduler.alphas_cumprod[int(t)].to(device=z.device, dtype=z.dtype)
        return a.sqrt() * model_fn(z, t) + (1 - a).sqrt() * z

    return eps_fn


def step_kwargs(scheduler, info: SamplerInfo, generators: Sequence[torch.Generator]) -> dict:
    """The stock pipeline's ``prepare_extra_step_kwargs``: eta and generator where accepted."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {"eta": 0.0} if "eta" in accepted else {}  # the stock pipeline's default eta
    kwargs.update({k: v for k, v in info.step_kwargs.items() if k in accepted})
    if "generator" in accepted:
        kwargs["generator"] = list(generators)
    return kwargs


def _level(scheduler, timesteps: torch.Tensor, i: int) -> NoiseLevel:
    if i + 1 >= len(timesteps):
        return NoiseLevel(sigma=None, timestep=None, add_noise=lambda x0, noise: x0)
    t_next = timesteps[i + 1 : i + 2]
    return NoiseLevel(sigma=None, timestep=t_next[0],
                      add_noise=lambda x0, noise: scheduler.add_noise(x0, noise, t_next))


def run(info: SamplerInfo, schedule: str | None, *, steps: int, scheduler_config: dict, model_fn,
        noise: torch.Tensor, generators: Sequence[torch.Generator], init_latents, img2img_steps: int,
        report) -> torch.Tensor:
    scheduler = make_scheduler(info, schedule, scheduler_config, generators)
    scheduler.set_timesteps(steps, device=noise.device)
    timesteps = scheduler.timesteps

    if init_latents is None:
        latents = noise * scheduler.init_noise_sigma
    else:
        begin = (steps - img2img_steps) * scheduler.order
        timesteps = timesteps[begin:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        latents = scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(noise.shape[0]))

    if _feeds_eps(info, scheduler_config):
        model_fn = _v_to_eps(scheduler, model_fn)
    extra = step_kwargs(scheduler, info, generators)
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(latents, t)
        model_output = model_fn(model_input, t)
        out = scheduler.step(model_output, t, latents, **extra, return_dict=True)
        latents = out.prev_sample
        denoised = getattr(out, "pred_original_sample", None)
        if denoised is None:
            denoised = getattr(out, "denoised", None)
        latents = report(i, total, latents, denoised, _level(scheduler, timesteps, i))
    return latents
