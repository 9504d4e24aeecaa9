"""``sample(...)``: the one entry point the pipeline calls for a denoising run."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from malerei.engine.errors import Cancelled, InvalidParameter

from . import run_diffusers, run_k
from .hooks import step_reporter
from .registry import resolve


def img2img_steps(steps: int, strength: float) -> int:
    """How many steps img2img runs, A1111's way (``setup_img2img_steps``, "fix steps" off):
    t_enc = int(min(strength, 0.999) * steps), and the sampler runs the last t_enc + 1 steps of
    the full ``steps``-step schedule. strength 1 runs them all."""
    return min(steps, int(min(strength, 0.999) * steps) + 1)


def _guard(model_fn: Callable, cancel: Callable[[], bool] | None) -> Callable:
    """model_fn, checking ``cancel()`` before every call: a cancel stops within one step."""
    if cancel is None:
        return model_fn

    def guarded(latent_input, timestep):
        if cancel():
            raise Cancelled("generation cancelled")
        return model_fn(latent_input, timestep)

    return guarded


def _check(*, steps, noise, generators, init_latents, strength) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidParameter(f"steps must be a whole number of at least 1, got {steps!r}")
    if len(generators) != noise.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {noise.shape[0]} noise tensors")
    if init_latents is None:
        if strength != 1.0:
            raise InvalidParameter("strength (denoising strength) only applies to img2img; leave it at 1.0")
        return
    if not 0.0 < strength <= 1.0:
        raise InvalidParameter(f"denoising strength must be in (0, 1], got {strength!r}")
    if init_latents.shape != noise.shape:
        raise ValueError(f"init latents {tuple(init_latents.shape)} and noise {tuple(noise.shape)} differ in shape")


def sample(*, sampler: str, schedule: str, steps: int, scheduler_config: dict,
           model_fn: Callable[[torch.Tensor, torch.Tensor | float], torch.Tensor],
           noise: torch.Tensor, generators: Sequence[torch.Generator],
           init_latents: torch.Tensor | None = None, strength: float = 1.0,
           blend: Callable | None = None, callback: Callable | None = None,
           cancel: Callable[[], bool] | None = None, model_family: str | None = None) -> torch.Tensor:
    """Run sampler ``sampler`` with schedule type ``schedule`` and return the final latents.

    - ``scheduler_config``: the model's diffusers scheduler config (prediction_type, betas,
      timestep_spacing, ...); never modified.
    - ``model_fn(latent_input, timestep)``: the raw UNet output (eps or v) with CFG applied.
    - ``noise``: unit-variance initial noise [B, C, H, W]; ``generators``: one per image, for the
      per-step noise of stochastic samplers.
    - img2img: ``init_latents`` and ``strength`` in (0, 1]: runs :func:`img2img_steps` steps
      from the init latents noised to the first of them.
    - ``blend(x, step_index, level) -> x`` after each step, ``level`` a
      :class:`.hooks.NoiseLevel`; ``callback(step_index, total_steps, x, denoised_or_None)``.
      A step is one model call for diffusers schedulers (second-order ones make two per step)
      and one sampler step for k samplers.
    - ``cancel() -> True`` raises :class:`~malerei.engine.errors.Cancelled` before the next model call.
    - ``model_family``: "sdxl" picks SDXL's Align Your Steps levels; others use SD1.x's.
    """
    # 1. Names -> sampler and schedule (raises InvalidParameter listing the allowed names)
    info, schedule_key = resolve(sampler, schedule)
    _check(steps=steps, noise=noise, generators=generators, init_latents=init_latents, strength=strength)

    # 2. One run: everything it holds (scheduler, sigmas, noise sampler) is built fresh here
    run_args = dict(
        steps=steps, scheduler_config=scheduler_config, model_fn=_guard(model_fn, cancel),
        noise=noise, generators=list(generators), init_latents=init_latents,
        img2img_steps=img2img_steps(steps, strength), report=step_reporter(blend, callback),
    )
    with torch.no_grad():
        if info.kind == "diffusers":
            return run_diffusers.run(info, schedule_key, **run_args)
        return run_k.run(info, schedule_key, family=model_family, **run_args)
