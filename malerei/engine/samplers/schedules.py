"""Sigma schedules for the k samplers: pure functions, ``n`` steps -> ``n + 1`` sigmas ending at 0.

These follow A1111's ``modules/sd_schedulers.py`` (which wraps k-diffusion's ``get_sigmas_*``)
so a k sampler with schedule type X lays its steps where A1111 would. sigma_min / sigma_max are
the model's smallest and largest training noise levels. The diffusers samplers do not use this
file: their schedules are config options of the scheduler (see ``registry.diffusers_overrides``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .discrete import ModelSigmas

# NVIDIA's 10-step "Align Your Steps" noise levels (research.nvidia.com/labs/toronto-ai/AlignYourSteps).
_AYS_SD1 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
_AYS_SDXL = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]


def _with_zero(sigmas) -> torch.Tensor:
    sigmas = torch.as_tensor(np.array(sigmas, dtype=np.float64))  # a copy: no negative strides
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: evenly spaced in sigma**(1/rho)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _with_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Evenly spaced in log(sigma)."""
    return _with_zero(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)))


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """log(sigma) follows ramp**rho (rho=1 is Exponential); A1111's default rho is 1."""
    ramp = np.linspace(1, 0, n) ** rho
    return _with_zero(np.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def uniform(n: int, table: ModelSigmas) -> torch.Tensor:
    """Timesteps evenly spaced from the last training step down to 0 (k-diffusion get_sigmas)."""
    t = torch.linspace(len(table) - 1, 0, n)
    return _with_zero(table.t_to_sigma(t).double().numpy())


def normal(n: int, table: ModelSigmas) -> torch.Tensor:
    """Timesteps evenly spaced between sigma_max's and sigma_min's; on a discrete model these are
    the first and last training steps, so this equals :func:`uniform`, as in A1111."""
    start, end = table.sigma_to_t(table.sigma_max), table.sigma_to_t(table.sigma_min)
    return _with_zero(table.t_to_sigma(torch.linspace(float(start), float(end), n)).double().numpy())


def sgm_uniform(n: int, table: ModelSigmas) -> torch.Tensor:
    """n + 1 evenly spaced timesteps with the last (t=0) dropped, then sigma 0."""
    start, end = table.sigma_to_t(table.sigma_max), table.sigma_to_t(table.sigma_min)
    t = torch.linspace(float(start), float(end), n + 1)[:-1]
    return _with_zero(table.t_to_sigma(t).double().numpy())


def simple(n: int, table: ModelSigmas) -> torch.Tensor:
    """Every (T/n)-th training sigma, counted down from the top."""
    stride = len(table) / n
    return _with_zero([float(table.sigmas[-(1 + int(i * stride))]) for i in range(n)])


def ddim(n: int, table: ModelSigmas) -> torch.Tensor:
    """The DDIM paper's timesteps 1, 1+k, 1+2k, ... (k = T // n), highest first.

    As in A1111, when k does not divide T this gives a step or two more than ``n``.
    """
    stride = max(len(table) // n, 1)
    t = list(range(1, len(table), stride))[::-1]
    return _with_zero([float(table.sigmas[i]) for i in t])


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """sigma = tan((1 - s) atan(sigma_max) + s atan(sigma_min)), s evenly spaced in [0, 1].

    A1111 stops at sigma_min and leaves that noise in the image; here the n levels run from
    sigma_max to sigma_min and a final step goes to 0 (ComfyUI's form), like every other schedule.
    """
    s = np.linspace(0, 1, n)
    return _with_zero(np.tan((1 - s) * math.atan(sigma_max) + s * math.atan(sigma_min)))


def align_your_steps(n: int, family: str | None = None) -> torch.Tensor:
    """NVIDIA's levels (SDXL's for family "sdxl", else SD1.x's), log-linearly resampled to n
    levels when n differs from the 11 published ones, then 0 (A1111's convention)."""
    levels = _AYS_SDXL if family == "sdxl" else _AYS_SD1
    if n == len(levels):
        return _with_zero(levels)
    xs = np.linspace(0, 1, len(levels))
    log_rev = np.log(levels[::-1])
    resampled = np.exp(np.interp(np.linspace(0, 1, n), xs, log_rev))[::-1]
    return _with_zero(resampled)


def beta(n: int, sigma_min: float, sigma_max: float, a: float = 0.6, b: float = 0.6) -> torch.Tensor:
    """Sigmas at Beta(a, b) quantiles of [sigma_min, sigma_max] (Lee et al. 2024, arXiv:2407.12173;
    A1111's default a = b = 0.6, mapped linearly in sigma as A1111 does)."""
    from scipy import stats  # scipy comes with torchsde, a dependency

    q = stats.beta.ppf(1 - np.linspace(0, 1, n), a, b)
    return _with_zero(sigma_min + q * (sigma_max - sigma_min))


def compute(schedule: str, n: int, table: ModelSigmas, *, family: str | None = None) -> torch.Tensor:
    """Sigmas for ``n`` steps of schedule type ``schedule`` (a registry key)."""
    lo, hi = table.sigma_min, table.sigma_max
    by_name = {
        "uniform": lambda: uniform(n, table),
        "normal": lambda: normal(n, table),
        "karras": lambda: karras(n, lo, hi),
        "exponential": lambda: exponential(n, lo, hi),
        "polyexponential": lambda: polyexponential(n, lo, hi),
        "sgm_uniform": lambda: sgm_uniform(n, table),
        "kl_optimal": lambda: kl_optimal(n, lo, hi),
        "align_your_steps": lambda: align_your_steps(n, family),
        "simple": lambda: simple(n, table),
        "ddim": lambda: ddim(n, table),
        "beta": lambda: beta(n, lo, hi),
    }
    return by_name[schedule]()
