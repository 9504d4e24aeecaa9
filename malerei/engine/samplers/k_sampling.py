"""k-diffusion-style samplers for the algorithms diffusers lacks. Pure functions, one signature:

    sample_xxx(model, x, sigmas, *, noise_sampler, callback=None, **options) -> x

- ``model(x, sigma) -> denoised`` (a :class:`.denoiser.Denoiser`), x = x0 + sigma * eps;
- ``sigmas``: 1-D float tensor, decreasing, ending at 0 (a :mod:`.schedules` schedule);
- ``noise_sampler(sigma, sigma_next) -> unit Gaussian like x`` (per-image generators, never the
  global RNG);
- ``callback(i=, total=, x=, denoised=, sigma_next=)`` after each step; when it returns a
  tensor, that tensor replaces x (inpainting blends hook in there).
"""

from __future__ import annotations

import math

import torch

from .schedules import karras


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma -> sigma_next into a deterministic part down to ``sigma_down`` and fresh
    noise of size ``sigma_up``, with sigma_down**2 + sigma_up**2 = sigma_next**2 (eta = 1: the
    DDPM posterior variance; eta = 0: no noise)."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def _report(callback, x, **info):
    if callback is None:
        return x
    replaced = callback(x=x, **info)
    return x if replaced is None else replaced


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, *, noise_sampler, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S), ancestral: each step is a second-order singlestep DPM-Solver++ update
    (Lu et al. 2022, arXiv:2211.01095, algorithm 1 with r = 1/2) from sigma down to sigma_down,
    then fresh noise of size sigma_up. The last step (to sigma 0) is a plain Euler step.

    In log-SNR time lambda = -log(sigma) the update from lambda to lambda + h is
        x <- (sigma_next / sigma) x - expm1(-h) D,
    with D taken at the midpoint lambda + h/2 for second order.
    """
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = denoised  # Euler to sigma 0: x + (x - D) / sigma * (0 - sigma)
        else:
            h = math.log(sigma) - math.log(sigma_down)
            sigma_mid = math.exp(-(-math.log(sigma) + h / 2))
            x_mid = (sigma_mid / sigma) * x - math.expm1(-h / 2) * denoised
            denoised_mid = model(x_mid, sigma_mid)
            x = (sigma_down / sigma) * x - math.expm1(-h) * denoised_mid
        if sigma_next > 0 and sigma_up > 0:
            x = x + noise_sampler(sigma, sigma_next) * (s_noise * sigma_up)
        x = _report(callback, x, i=i, total=total, denoised=denoised, sigma_next=sigma_next)
    return x


def restart_plan(sigmas: torch.Tensor) -> list[tuple[float, float]]:
    """The (sigma, sigma_next) segments Restart walks, with A1111's automatic plan.

    Below 20 steps there is no restart. From 20 steps on, the main schedule becomes Karras with
    fewer steps, and once it passes sigma ~0.1 it jumps back up to sigma ~2 and descends again
    over ``restart_steps`` Karras steps, ``restart_times`` times (9 steps once; from 36 steps on,
    steps // 4 steps twice), keeping about the requested number of steps in all.
    """
    steps = len(sigmas) - 1
    restarts: dict[int, tuple[int, int, float]] = {}
    if steps >= 20:
        restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = karras(steps - restart_steps * restart_times, float(sigmas[-2]), float(sigmas[0]))
        at = int(torch.argmin((sigmas - 0.1).abs()))
        restarts[at] = (restart_steps + 1, restart_times, 2.0)
    segments = []
    for i in range(len(sigmas) - 1):
        segments.append((float(sigmas[i]), float(sigmas[i + 1])))
        if i + 1 in restarts:
            n, times, restart_max = restarts[i + 1]
            top = int(torch.argmin((sigmas - restart_max).abs()))
            if top < i + 1:
                climb = karras(n, float(sigmas[i + 1]), float(sigmas[top]))[:-1]
                for _ in range(times):
                    segments.extend(zip(climb[:-1].tolist(), climb[1:].tolist()))
    return segments


@torch.no_grad()
def sample_restart(model, x, sigmas, *, noise_sampler, callback=None, s_noise=1.0):
    """Restart sampling (Xu et al. 2023, arXiv:2306.14878): Heun steps down the schedule; at a
    restart the latents are pushed back up to a higher sigma with fresh noise
    (x += sqrt(sigma_hi**2 - sigma_lo**2) * noise) and the interval is solved again, letting the
    forward noise contract errors the ODE steps accumulated."""
    segments = restart_plan(sigmas)
    total = len(segments)
    previous = None
    for i, (sigma, sigma_next) in enumerate(segments):
        if previous is not None and previous < sigma:
            x = x + noise_sampler(previous, sigma) * (s_noise * math.sqrt(sigma**2 - previous**2))
        denoised = model(x, sigma)
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        x_next = x + d * dt
        if sigma_next > 0:  # Heun's correction (Karras et al. 2022, algorithm 1)
            d_next = (x_next - model(x_next, sigma_next)) / sigma_next
            x_next = x + (d + d_next) / 2 * dt
        x = _report(callback, x_next, i=i, total=total, denoised=denoised, sigma_next=sigma_next)
        previous = sigma_next
    return x
