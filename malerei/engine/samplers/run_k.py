"""The loop for k samplers: A1111's ``KDiffusionSampler.sample`` / ``sample_img2img``.

txt2img: x = noise * sigmas[0]. img2img: the last ``img2img_steps`` steps of the schedule
(A1111: ``sigmas[steps - t_enc - 1:]``), starting from init + noise * their first sigma.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import k_sampling, schedules
from .denoiser import Denoiser
from .discrete import ModelSigmas
from .hooks import NoiseLevel
from .noise_sampler import PerImageNoise
from .registry import SamplerInfo


def run(info: SamplerInfo, schedule: str | None, *, steps: int, scheduler_config: dict, model_fn,
        noise: torch.Tensor, generators: Sequence[torch.Generator], init_latents, img2img_steps: int,
        report, family: str | None = None) -> torch.Tensor:
    table = ModelSigmas.from_config(scheduler_config)
    sigmas = schedules.compute(schedule or "uniform", steps, table, family=family)
    if init_latents is None:
        x = noise * sigmas[0]
    else:
        sigmas = sigmas[len(sigmas) - 1 - img2img_steps :]
        x = init_latents + noise * sigmas[0]

    denoiser = Denoiser(model_fn, table, scheduler_config.get("prediction_type", "epsilon"))

    def on_step(*, i, total, x, denoised, sigma_next):
        level = NoiseLevel(sigma=sigma_next, timestep=None,
                           add_noise=lambda x0, eps: x0 + sigma_next * eps if sigma_next > 0 else x0)
        return report(i, total, x, denoised, level)

    sampler = getattr(k_sampling, info.implementation)
    return sampler(denoiser, x, sigmas, noise_sampler=PerImageNoise(noise, generators),
                   callback=on_step, **info.options)
