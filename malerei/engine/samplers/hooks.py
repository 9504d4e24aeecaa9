"""What the sampling loops tell the pipeline after each step: progress, and a chance to blend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseLevel:
    """The noise level the latents are at after a step, for inpainting blends.

    ``noised(x0, noise)`` brings clean latents ``x0`` to this level in the sampler's own latent
    scaling (x0 + sigma * noise for k samplers and sigma-scaled diffusers schedulers,
    sqrt(a) x0 + sqrt(1 - a) noise for DDIM-like ones); after the last step it returns ``x0``.
    """

    sigma: float | None  # k samplers: the sigma reached (0 at the end); None for diffusers
    timestep: torch.Tensor | None  # diffusers: the next timestep; None at the end / for k
    add_noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def noised(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.add_noise(x0, noise)


def step_reporter(blend, callback):
    """One per-step hook: ``blend(x, i, level) -> x`` first, then ``callback(i, total, x, denoised)``."""

    def report(i: int, total: int, x: torch.Tensor, denoised, level: NoiseLevel) -> torch.Tensor:
        if blend is not None:
            x = blend(x, i, level)
        if callback is not None:
            callback(i, total, x, denoised)
        return x

    return report
