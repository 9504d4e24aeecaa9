"""The model's discrete noise levels: training timestep t <-> sigma, as k-diffusion sees them.

A DDPM-style model is trained at timesteps t = 0..T-1 with cumulative alphas a_t. In the
variance-exploding view that k-diffusion samplers use, the latents at t are x0 + sigma_t * eps
with sigma_t = sqrt((1 - a_t) / a_t) (Karras et al. 2022, table 1, "VP" column). A sigma between
two training levels maps to a fractional t by interpolating log-sigma, as k-diffusion's
``DiscreteSchedule.sigma_to_t`` does without quantisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelSigmas:
    sigmas: torch.Tensor  # float32, ascending: sigmas[t] for t = 0..T-1
    log_sigmas: torch.Tensor

    @classmethod
    def from_config(cls, scheduler_config: dict) -> ModelSigmas:
        """From a diffusers scheduler config (betas, beta_schedule, trained_betas, zero-SNR)."""
        from diffusers import EulerDiscreteScheduler

        # diffusers computes alphas_cumprod for every beta_schedule it knows (and clamps the
        # zero-SNR last step to 2**-24); borrowing it keeps both sampler kinds on one table.
        alphas_cumprod = EulerDiscreteScheduler.from_config(dict(scheduler_config)).alphas_cumprod
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().to(torch.float32)
        return cls(sigmas=sigmas, log_sigmas=sigmas.log())

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def __len__(self) -> int:
        return len(self.sigmas)

    def sigma_to_t(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """Fractional training timestep of a noise level (log-sigma interpolation, clamped)."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float32).log()
        high = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self) - 1)
        low = high - 1
        lo, hi = self.log_sigmas[low], self.log_sigmas[high]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return low.to(torch.float32) + w

    def t_to_sigma(self, t: float | torch.Tensor) -> torch.Tensor:
        """Noise level of a (fractional) training timestep."""
        t = torch.as_tensor(t, dtype=torch.float32).clamp(0, len(self) - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()
