"""The sampler and schedule tables: A1111's names -> what runs them. Plain data, no torch.

A sampler is either

- ``kind="diffusers"``: a diffusers scheduler class plus ``from_config`` overrides. Every job
  builds a fresh instance (diffusers schedulers keep per-run state such as ``_step_index``), and
  the loop is the stock ``StableDiffusionPipeline`` loop, so the latents equal a stock diffusers
  pipeline configured with the same scheduler; or
- ``kind="k"``: a k-diffusion-style pure function in :mod:`.k_sampling`, for the algorithms
  diffusers lacks, run on a sigma schedule from :mod:`.schedules`.

Schedule types are A1111's "Schedule type" list (``modules/sd_schedulers.py``). k samplers take
all of them. A diffusers sampler takes those its scheduler class can express through config
options (``timestep_spacing``, ``use_karras_sigmas``, ...); any other combination is refused
with a message naming the allowed ones.

"Automatic" is the sampler's A1111 default (``samplers_k_diffusion`` options in
``modules/sd_samplers_kdiffusion.py``, v1.9+: DPM++ 2M/SDE/2S a and DPM2 -> Karras, the SDE
multistep samplers -> Exponential). Where A1111's default is its plain uniform schedule,
"Automatic" on a diffusers sampler keeps the model's own scheduler config untouched (its
``timestep_spacing``, any ``use_karras_sigmas`` it sets), which is what a stock diffusers
pipeline does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from malerei.engine.errors import InvalidParameter

# --------------------------------------------------------------------------------------------
# Schedule types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ScheduleInfo:
    name: str  # key used in code and accepted on the command line
    label: str  # A1111's label, what infotext carries ("Schedule type: Karras")
    aliases: tuple[str, ...] = ()
    diffusers: str = ""  # how diffusers samplers express it; "" when they cannot
    description: str = ""


SCHEDULES: tuple[ScheduleInfo, ...] = (
    ScheduleInfo(
        name="automatic",
        label="Automatic",
        aliases=("auto", "default"),
        diffusers="the sampler's default (the model's scheduler config where A1111 uses Uniform)",
        description="the sampler's A1111 default schedule",
    ),
    ScheduleInfo(
        name="uniform",
        label="Uniform",
        diffusers="timestep_spacing='linspace'",
        description="timesteps evenly spaced from the last training step to 0 (k-diffusion get_sigmas)",
    ),
    ScheduleInfo(
        name="karras",
        label="Karras",
        diffusers="use_karras_sigmas=True",
        description="Karras et al. 2022 eq. 5, rho=7, between the model's sigma_min and sigma_max",
    ),
    ScheduleInfo(
        name="exponential",
        label="Exponential",
        diffusers="use_exponential_sigmas=True",
        description="sigmas evenly spaced in log(sigma)",
    ),
    ScheduleInfo(
        name="polyexponential",
        label="Polyexponential",
        description="k-diffusion get_sigmas_polyexponential, rho=1",
    ),
    ScheduleInfo(
        name="sgm_uniform",
        label="SGM Uniform",
        aliases=("sgmuniform",),
        diffusers="timestep_spacing='trailing'",
        description="n timesteps evenly spaced, the end point dropped (Stability's sgm)",
    ),
    ScheduleInfo(
        name="kl_optimal",
        label="KL Optimal",
        description="tan-spaced sigmas (Sabour et al. 2024, 'Align Your Steps' appendix)",
    ),
    ScheduleInfo(
        name="align_your_steps",
        label="Align Your Steps",
        aliases=("ays",),
        description="NVIDIA's optimised 10-step sigmas for SD1.x / SDXL, log-linearly resampled",
    ),
    ScheduleInfo(
        name="simple",
        label="Simple",
        diffusers="timestep_spacing='trailing' (close: A1111 floors where diffusers rounds)",
        description="every (1000/n)-th training sigma from the top",
    ),
    ScheduleInfo(
        name="normal",
        label="Normal",
        diffusers="timestep_spacing='linspace'",
        description="timesteps evenly spaced between sigma_max and sigma_min (same as Uniform here)",
    ),
    ScheduleInfo(
        name="ddim",
        label="DDIM",
        aliases=("ddim_uniform",),
        diffusers="timestep_spacing='leading', steps_offset=1",
        description="the DDIM paper's timesteps 1, 1+k, 1+2k, ... with k = 1000 // n",
    ),
    ScheduleInfo(
        name="beta",
        label="Beta",
        diffusers="use_beta_sigmas=True",
        description="sigmas at the quantiles of Beta(0.6, 0.6) (Lee et al. 2024)",
    ),
)

# diffusers config overrides per schedule type (the flags only where the class has them).
_SPACING_OPTIONS: dict[str, dict[str, Any]] = {
    "uniform": {"timestep_spacing": "linspace"},
    "normal": {"timestep_spacing": "linspace"},
    "sgm_uniform": {"timestep_spacing": "trailing"},
    "simple": {"timestep_spacing": "trailing"},
    "ddim": {"timestep_spacing": "leading", "steps_offset": 1},
}
_SIGMA_FLAGS: dict[str, str] = {
    "karras": "use_karras_sigmas",
    "exponential": "use_exponential_sigmas",
    "beta": "use_beta_sigmas",
}

# Which schedules a sampler accepts (besides "automatic").
SPACINGS: tuple[str, ...] = tuple(_SPACING_OPTIONS)
SPACINGS_AND_SIGMAS: tuple[str, ...] = SPACINGS + tuple(_SIGMA_FLAGS)
EVERY_SCHEDULE: tuple[str, ...] = tuple(s.name for s in SCHEDULES if s.name != "automatic")
ONLY_AUTOMATIC: tuple[str, ...] = ()

# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SamplerInfo:
    name: str  # A1111's label: what users type and what infotext records
    aliases: tuple[str, ...] = ()
    kind: str  # "diffusers" | "k"
    implementation: str  # diffusers scheduler class name, or a function name in k_sampling
    options: dict[str, Any] = field(default_factory=dict)  # from_config overrides / k keyword args
    step_kwargs: dict[str, Any] = field(default_factory=dict)  # the stock pipeline's `eta`
    default_schedule: str | None  # "Automatic"; None: the model config's own timesteps
    schedules: tuple[str, ...]  # schedule types accepted besides "automatic"
    stochastic: bool  # draws fresh noise while sampling (ancestral / SDE)
    v_as_eps: bool = False  # diffusers only: on v-prediction models, hand the scheduler eps
    note: str = ""

    def describe(self) -> str:
        """One line saying what runs this sampler, e.g. for ``malerei samplers``."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        if self.kind == "diffusers":
            step = ", ".join(f"{k}={v!r}" for k, v in self.step_kwargs.items())
            return f"diffusers {self.implementation}({args})" + (f", step({step})" if step else "")
        return f"k_sampling.{self.implementation}({args})"


def _d(name, cls, *, aliases=(), options=None, step_kwargs=None, default=None,
       schedules=SPACINGS_AND_SIGMAS, stochastic=False, v_as_eps=False, note=""):
    return SamplerInfo(name=name, aliases=tuple(aliases), kind="diffusers", implementation=cls,
                       options=dict(options or {}), step_kwargs=dict(step_kwargs or {}),
                       default_schedule=default, schedules=schedules, stochastic=stochastic,
                       v_as_eps=v_as_eps, note=note)


def _k(name, fn, *, aliases=(), options=None, default=None, schedules=EVERY_SCHEDULE,
       stochastic=False, note=""):
    return SamplerInfo(name=name, aliases=tuple(aliases), kind="k", implementation=fn,
                       options=dict(options or {}), default_schedule=default, schedules=schedules,
                       stochastic=stochastic, note=note)


_DPM_MULTI = "DPMSolverMultistepScheduler"

# Order: A1111's sampler dropdown (k-diffusion samplers, then the timestep ones), then extras.
SAMPLERS: tuple[SamplerInfo, ...] = (
    _d("DPM++ 2M", _DPM_MULTI, aliases=("k_dpmpp_2m", _DPM_MULTI),
       options={"algorithm_type": "dpmsolver++", "solver_order": 2}, default="karras"),
    _d("DPM++ SDE", "DPMSolverSDEScheduler", aliases=("k_dpmpp_sde", "DPMSolverSDEScheduler"),
       default="karras", stochastic=True,
       note="Brownian-tree noise, one tree per image seeded with its generator's seed"),
    _d("DPM++ 2M SDE", _DPM_MULTI, aliases=("k_dpmpp_2m_sde",),
       options={"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "midpoint"},
       default="exponential", stochastic=True,
       note="per-step Gaussian noise where A1111 uses a Brownian tree (same distribution)"),
    _d("DPM++ 2M SDE Heun", _DPM_MULTI, aliases=("k_dpmpp_2m_sde_heun",),
       options={"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "heun"},
       default="exponential", stochastic=True,
       note="per-step Gaussian noise where A1111 uses a Brownian tree (same distribution)"),
    _k("DPM++ 2S a", "sample_dpmpp_2s_ancestral", aliases=("k_dpmpp_2s_a", "dpmpp_2s_ancestral"),
       default="karras", stochastic=True),
    _d("DPM++ 3M SDE", _DPM_MULTI, aliases=("k_dpmpp_3m_sde",),
       options={"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
       default="exponential", stochastic=True,
       note="A1111 also drops the next-to-last sigma; diffusers cannot, so the last steps differ"),
    _d("Euler a", "EulerAncestralDiscreteScheduler",
       aliases=("k_euler_a", "k_euler_ancestral", "euler_ancestral", "EulerAncestralDiscreteScheduler"),
       schedules=SPACINGS, stochastic=True),
    _d("Euler", "EulerDiscreteScheduler", aliases=("k_euler", "EulerDiscreteScheduler")),
    _d("LMS", "LMSDiscreteScheduler", aliases=("k_lms", "LMSDiscreteScheduler")),
    _d("Heun", "HeunDiscreteScheduler", aliases=("k_heun", "HeunDiscreteScheduler")),
    _d("DPM2", "KDPM2DiscreteScheduler", aliases=("k_dpm_2", "KDPM2DiscreteScheduler"),
       default="karras",
       note="A1111 also drops the next-to-last sigma; diffusers cannot, so the last steps differ"),
    _d("DPM2 a", "KDPM2AncestralDiscreteScheduler",
       aliases=("k_dpm_2_a", "dpm_2_ancestral", "KDPM2AncestralDiscreteScheduler"),
       default="karras", stochastic=True,
       note="A1111 also drops the next-to-last sigma; diffusers cannot, so the last steps differ"),
    _k("Restart", "sample_restart", aliases=("restart",), default="karras", stochastic=True,
       note="Xu et al. 2023; A1111's automatic restart plan (from 20 steps on)"),
    _d("DDIM", "DDIMScheduler", aliases=("DDIMScheduler",), step_kwargs={"eta": 0.0},
       schedules=SPACINGS),
    _d("PLMS", "PNDMScheduler", aliases=("pndm", "PNDMScheduler"),
       options={"skip_prk_steps": True}, schedules=SPACINGS, v_as_eps=True,
       note="on v-prediction models it is given eps (as A1111 does): diffusers' PNDM extrapolates "
            "raw v across timesteps, which misses the data"),
    _d("UniPC", "UniPCMultistepScheduler", aliases=("uni_pc", "UniPCMultistepScheduler"),
       options={"solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
       note="A1111's defaults (order 3, variant bh1); like A1111's UniPC it stops at sigma_min "
            "(diffusers' bh1 gives NaN on a final step to sigma 0)"),
    _d("LCM", "LCMScheduler", aliases=("LCMScheduler",), schedules=ONLY_AUTOMATIC,
       stochastic=True, note="for LCM / LCM-LoRA models; its own 50-step training schedule"),
    # Not in A1111's list; diffusers has them.
    _d("DDPM", "DDPMScheduler", aliases=("DDPMScheduler",), schedules=SPACINGS, stochastic=True),
    _d("DEIS", "DEISMultistepScheduler", aliases=("DEISMultistepScheduler",)),
    _d("TCD", "TCDScheduler", aliases=("TCDScheduler",), step_kwargs={"eta": 0.3},
       schedules=ONLY_AUTOMATIC, stochastic=True,
       note="for TCD / LCM-style models; eta (gamma) 0.3 as diffusers recommends"),
)

# --------------------------------------------------------------------------------------------
# Lookup
# --------------------------------------------------------------------------------------------


def _key(name: str) -> str:
    """Case-, space- and punctuation-blind key: 'DPM++ 2M' == 'dpmpp_2m' == 'dpmpp-2m'."""
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("++", "pp"))


def _index(items, names) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for item in items:
        for n in names(item):
            k = _key(n)
            if k in table and table[k] is not item:
                raise RuntimeError(f"name {n!r} is given to two entries")  # a table bug
            table[k] = item
    return table


_SAMPLERS_BY_KEY = _index(SAMPLERS, lambda s: (s.name, *s.aliases))
_SCHEDULES_BY_KEY = _index(SCHEDULES, lambda s: (s.name, s.label, *s.aliases))
_SCHEDULE_LABELS = {s.name: s.label for s in SCHEDULES}
# Old A1111 names carried the schedule in the sampler name ("DPM++ 2M Karras").
_LEGACY_SUFFIXES = ("karras", "exponential")


def list_samplers() -> list[SamplerInfo]:
    """Every sampler, in A1111's dropdown order (extras last)."""
    return list(SAMPLERS)


def list_schedules() -> list[ScheduleInfo]:
    """Every schedule type, in A1111's order."""
    return list(SCHEDULES)


def schedule_label(name: str | None) -> str:
    """A1111's label for a schedule key (None: "Automatic")."""
    return _SCHEDULE_LABELS[name or "automatic"]


def _sampler_names() -> str:
    return ", ".join(s.name for s in SAMPLERS)


def _schedule_names(names) -> str:
    return ", ".join(_SCHEDULE_LABELS[n] for n in names)


def find_schedule(name: str) -> ScheduleInfo:
    """The schedule type called ``name`` (A1111 label, key or alias, any case)."""
    info = _SCHEDULES_BY_KEY.get(_key(name or ""))
    if info is None:
        raise InvalidParameter(
            f"unknown schedule type {name!r}; allowed: {_schedule_names(['automatic', *EVERY_SCHEDULE])}"
        )
    return info


def find_sampler(name: str) -> SamplerInfo:
    """The sampler called ``name`` (A1111 label, alias or diffusers class name, any case)."""
    return resolve(name, "automatic")[0]


def resolve(sampler: str, schedule: str = "automatic") -> tuple[SamplerInfo, str | None]:
    """Sampler and the schedule key it runs with; ``None`` means the model config's own timesteps.

    Accepts A1111's old combined names ("DPM++ 2M Karras", "k_dpmpp_2m_ka" style keys ending in
    karras/exponential) when the schedule is Automatic or agrees.
    """
    requested = find_schedule(schedule).name
    key = _key(sampler or "")
    info = _SAMPLERS_BY_KEY.get(key)
    if info is None:
        for suffix in _LEGACY_SUFFIXES:
            base = _SAMPLERS_BY_KEY.get(key[: -len(suffix)]) if key.endswith(suffix) else None
            if base is not None:
                if requested not in ("automatic", suffix):
                    raise InvalidParameter(
                        f"sampler {sampler!r} names the {schedule_label(suffix)} schedule but "
                        f"schedule type {schedule_label(requested)} was asked for; use sampler "
                        f"{base.name!r} with the schedule type you want"
                    )
                info, requested = base, suffix
                break
    if info is None:
        raise InvalidParameter(f"unknown sampler {sampler!r}; allowed: {_sampler_names()}")
    if requested == "automatic":
        return info, info.default_schedule
    if requested not in info.schedules:
        raise InvalidParameter(
            f"schedule type {schedule_label(requested)} is not available with sampler {info.name}; "
            f"allowed: {_schedule_names(['automatic', *info.schedules])}"
        )
    return info, requested


def diffusers_overrides(info: SamplerInfo, schedule: str | None) -> dict[str, Any]:
    """``from_config`` keyword overrides for a diffusers sampler run with ``schedule``."""
    overrides = dict(info.options)
    if schedule is None:
        return overrides
    if any(s in info.schedules for s in _SIGMA_FLAGS):
        # The model config may turn one on (some ship use_karras_sigmas=true): start from none.
        overrides.update({flag: False for flag in _SIGMA_FLAGS.values()})
    if schedule in _SIGMA_FLAGS:
        overrides[_SIGMA_FLAGS[schedule]] = True
    else:
        overrides.update(_SPACING_OPTIONS[schedule])
    return overrides
