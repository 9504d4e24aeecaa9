"""Per-step noise for the stochastic k samplers, one CPU generator per image.

Image i of a batch draws only from its own generator, on the generator's device (the CPU), and
the result is moved to the latents' device: a batch of N gives each image what it gets alone,
and a seed gives the same numbers on every device. This is diffusers' ``randn_tensor`` with a
list of generators, so both sampler kinds draw alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class PerImageNoise:
    """``noise(sigma, sigma_next) -> unit Gaussian like x`` (k-diffusion's noise_sampler shape)."""

    def __init__(self, like: torch.Tensor, generators: Sequence[torch.Generator]):
        if len(generators) != like.shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {like.shape[0]}")
        self.shape = tuple(like.shape)
        self.device = like.device
        self.dtype = like.dtype
        self.generators = list(generators)

    def __call__(self, sigma=None, sigma_next=None) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(self.shape, generator=self.generators, device=self.device, dtype=self.dtype)
