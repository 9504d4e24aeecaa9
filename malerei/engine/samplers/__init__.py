"""Samplers: A1111's sampler names and schedule types, and the denoising loop.

- :mod:`.registry`: the tables (plain data) and name lookup; no torch.
- :mod:`.loop`: ``sample(...)``, the entry point the pipeline calls.
- :mod:`.run_diffusers` / :mod:`.run_k`: the two loops (stock diffusers scheduler loop; k-style).
- :mod:`.k_sampling`: pure k-diffusion-style samplers for what diffusers lacks.
- :mod:`.schedules`, :mod:`.discrete`, :mod:`.denoiser`, :mod:`.noise_sampler`: their parts.

Importing this package imports no torch; ``sample`` and ``img2img_steps`` load the loop on
first use.
"""

from .registry import (
    SamplerInfo,
    ScheduleInfo,
    find_sampler,
    find_schedule,
    list_samplers,
    list_schedules,
    resolve,
    schedule_label,
)

__all__ = [
    "SamplerInfo",
    "ScheduleInfo",
    "find_sampler",
    "find_schedule",
    "img2img_steps",
    "list_samplers",
    "list_schedules",
    "resolve",
    "sample",
    "schedule_label",
]


def __getattr__(name: str):
    if name in ("sample", "img2img_steps"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
