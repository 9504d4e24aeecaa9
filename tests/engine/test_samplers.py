"""Samplers: names, schedules, the loop's contracts, and numerical correctness.

Two models stand in for a UNet:
- an analytic one that returns the exact eps (or v) for a known data distribution (a point mass
  at ``c``, or a Gaussian N(mu, s^2) per element), so a correct sampler must land on that data;
- a tiny random diffusers ``UNet2DConditionModel`` with CFG, for runs that must match a stock
  diffusers pipeline, reproduce, batch and thread like the real thing.
"""

from __future__ import annotations

import inspect
import math
import threading

import pytest
import torch

from malerei.engine.errors import Cancelled, InvalidParameter
from malerei.engine.samplers import (
    find_sampler,
    img2img_steps,
    list_samplers,
    list_schedules,
    resolve,
    sample,
)
from malerei.engine.samplers import schedules as sched
from malerei.engine.samplers.denoiser import Denoiser
from malerei.engine.samplers.discrete import ModelSigmas
from malerei.engine.samplers.registry import diffusers_overrides
from malerei.engine.samplers.run_diffusers import make_scheduler

SD_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "timestep_spacing": "leading",
}
# An SD 2.x-v style config (DDIMScheduler, leading spacing, v-prediction).
V_CONFIG = {**SD_CONFIG, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}

ALL_NAMES = [s.name for s in list_samplers()]
DIFFUSERS_NAMES = [s.name for s in list_samplers() if s.kind == "diffusers"]
K_NAMES = [s.name for s in list_samplers() if s.kind == "k"]

# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

# The SD beta schedule, computed here independently of the code under test.
_ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
_LOG_SIGMAS = ((1 - _ALPHAS_CUMPROD) / _ALPHAS_CUMPROD).sqrt().log()


def _alpha_bar(t) -> float:
    """a(t) at a possibly fractional timestep, log-sigma interpolated (k-diffusion convention)."""
    t = float(torch.as_tensor(t).double().clamp(0, 999))
    lo, hi = math.floor(t), math.ceil(t)
    sigma = math.exp((1 - (t - lo)) * _LOG_SIGMAS[lo] + (t - lo) * _LOG_SIGMAS[hi])
    return 1 / (1 + sigma**2)


class ExactModel:
    """The Bayes-optimal UNet for data x0 ~ N(mu, s^2) per element (s = 0: a point mass at mu).

    Given z = sqrt(a) x0 + sqrt(1 - a) eps, E[x0 | z] = mu + sqrt(a) s^2 (z - sqrt(a) mu) / (a s^2 + 1 - a).
    Returns eps_hat (or v_hat = sqrt(a) eps_hat - sqrt(1 - a) x0_hat). Counts its calls and
    records the timesteps it was asked about.
    """

    def __init__(self, mu: float, s: float = 0.0, prediction_type: str = "epsilon"):
        self.mu, self.s, self.prediction_type = mu, s, prediction_type
        self.calls = 0
        self.timesteps: list[float] = []

    def __call__(self, z: torch.Tensor, t) -> torch.Tensor:
        self.calls += 1
        self.timesteps.append(float(t))
        a = _alpha_bar(t)
        var = self.s**2
        x0 = self.mu + math.sqrt(a) * var * (z - math.sqrt(a) * self.mu) / (a * var + 1 - a)
        eps = (z - math.sqrt(a) * x0) / math.sqrt(1 - a)
        if self.prediction_type == "v_prediction":
            return math.sqrt(a) * eps - math.sqrt(1 - a) * x0
        return eps


def _gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _noise(gens, shape=(4, 8, 8)) -> torch.Tensor:
    return torch.cat([torch.randn((1, *shape), generator=g) for g in gens])


def _run(name, *, model, seeds=(1,), shape=(4, 8, 8), steps=4, schedule="Automatic",
         config=SD_CONFIG, **kwargs) -> torch.Tensor:
    gens = _gens(*seeds)
    return sample(sampler=name, schedule=schedule, steps=steps, scheduler_config=config,
                  model_fn=model, noise=_noise(gens, shape), generators=gens, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny tensors: intra-op threads only contend on the shared CPU (24x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2,
    ).eval()


def _cfg_model(unet, batch: int, guidance: float = 3.0, seed: int = 7):
    """model_fn with classifier-free guidance as one batched UNet call; returns (fn, cond, uncond)."""
    g = torch.Generator().manual_seed(seed)
    cond, uncond = torch.randn(batch, 4, 8, generator=g), torch.randn(batch, 4, 8, generator=g)

    def model_fn(x, t):
        out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + guidance * (out_cond - out_uncond)

    return model_fn, cond, uncond


# --------------------------------------------------------------------------------------------
# Registry and names
# --------------------------------------------------------------------------------------------


def test_at_least_twenty_samplers_with_a1111_names():
    a1111 = {"Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ 2M SDE Heun",
             "DPM++ 2S a", "DPM++ SDE", "DPM++ 3M SDE", "LMS", "DDIM", "PLMS", "UniPC", "LCM", "Restart"}
    assert a1111 <= set(ALL_NAMES)
    assert len(ALL_NAMES) >= 20
    assert len(set(ALL_NAMES)) == len(ALL_NAMES)
    assert {"diffusers", "k"} == {s.kind for s in list_samplers()}


def test_schedule_types_are_a1111s():
    labels = [s.label for s in list_schedules()]
    assert labels == ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform",
                      "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]


@pytest.mark.parametrize(("typed", "expected"), [
    ("euler a", "Euler a"), ("EULER_A", "Euler a"), ("k_euler_a", "Euler a"), ("euler_ancestral", "Euler a"),
    ("dpmpp_2m", "DPM++ 2M"), ("k_dpmpp_2m", "DPM++ 2M"), ("DPMSolverMultistepScheduler", "DPM++ 2M"),
    ("dpm++ 2m sde heun", "DPM++ 2M SDE Heun"), ("dpmpp_2s_a", "DPM++ 2S a"), ("EulerDiscreteScheduler", "Euler"),
    ("unipc", "UniPC"), ("uni_pc", "UniPC"), ("pndm", "PLMS"), ("k_dpm_2_a", "DPM2 a"),
])
def test_names_are_matched_loosely(typed, expected):
    assert find_sampler(typed).name == expected


def test_automatic_is_a1111s_default_schedule():
    assert resolve("DPM++ 2M", "Automatic")[1] == "karras"
    assert resolve("DPM++ SDE", "Automatic")[1] == "karras"
    assert resolve("DPM++ 2S a", "Automatic")[1] == "karras"
    assert resolve("DPM2", "automatic")[1] == "karras"
    assert resolve("DPM++ 2M SDE", "Automatic")[1] == "exponential"
    assert resolve("DPM++ 3M SDE", "Automatic")[1] == "exponential"
    # A1111's default is its plain uniform schedule here: the model config is kept as is.
    assert resolve("Euler", "Automatic")[1] is None
    assert resolve("Euler a", "Automatic")[1] is None


def test_legacy_combined_names():
    info, schedule = resolve("DPM++ 2M Karras", "Automatic")
    assert (info.name, schedule) == ("DPM++ 2M", "karras")
    assert resolve("k_dpmpp_2m_sde_exponential", "Automatic")[1] == "exponential"
    with pytest.raises(InvalidParameter, match="Karras"):
        resolve("DPM++ 2M Karras", "Exponential")


def test_unknown_sampler_lists_the_valid_names():
    with pytest.raises(InvalidParameter) as err:
        resolve("Euler b", "Automatic")
    for name in ALL_NAMES:
        assert name in str(err.value)


def test_unknown_schedule_lists_the_valid_names():
    with pytest.raises(InvalidParameter) as err:
        resolve("Euler", "Karras2")
    for info in list_schedules():
        assert info.label in str(err.value)


def test_unsupported_combination_names_the_allowed_ones():
    with pytest.raises(InvalidParameter) as err:
        resolve("Euler a", "Karras")  # EulerAncestralDiscreteScheduler has no use_karras_sigmas
    message = str(err.value)
    assert "Euler a" in message and "Uniform" in message and "SGM Uniform" in message
    assert "Karras" in message.split("allowed:")[0] and "Karras" not in message.split("allowed:")[1]
    with pytest.raises(InvalidParameter, match="allowed: Automatic"):
        resolve("LCM", "Uniform")
    with pytest.raises(InvalidParameter):
        sample(sampler="Euler", schedule="Align Your Steps", steps=3, scheduler_config=SD_CONFIG,
               model_fn=ExactModel(0.5), noise=torch.zeros(1, 4, 8, 8), generators=_gens(1))


@pytest.mark.parametrize("name", DIFFUSERS_NAMES)
def test_diffusers_table_matches_the_scheduler_classes(name):
    """Every override the table can produce is a real config option of that scheduler class."""
    import diffusers

    info = find_sampler(name)
    cls = getattr(diffusers, info.implementation)
    accepted = set(inspect.signature(cls.__init__).parameters)
    for schedule in (None, *info.schedules):
        unknown = set(diffusers_overrides(info, schedule)) - accepted
        assert not unknown, f"{name} with {schedule}: {unknown} are not {cls.__name__} options"
    step_params = set(inspect.signature(cls.step).parameters)
    assert set(info.step_kwargs) <= step_params


@pytest.mark.parametrize(("name", "schedule", "cls_name", "expected"), [
    ("DPM++ 2M", "Automatic", "DPMSolverMultistepScheduler",
     {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    ("DPM++ 2M", "Uniform", "DPMSolverMultistepScheduler",
     {"use_karras_sigmas": False, "timestep_spacing": "linspace"}),
    ("DPM++ 2M SDE", "Automatic", "DPMSolverMultistepScheduler",
     {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_exponential_sigmas": True}),
    ("DPM++ 2M SDE Heun", "Karras", "DPMSolverMultistepScheduler",
     {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "use_karras_sigmas": True}),
    ("DPM++ 3M SDE", "Automatic", "DPMSolverMultistepScheduler",
     {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    ("DPM++ SDE", "Automatic", "DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    ("Euler", "Automatic", "EulerDiscreteScheduler", {"timestep_spacing": "leading", "use_karras_sigmas": False}),
    ("Euler", "SGM Uniform", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("Euler", "Beta", "EulerDiscreteScheduler", {"use_beta_sigmas": True}),
    ("LMS", "Karras", "LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    ("DPM2 a", "Automatic", "KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    ("DDIM", "DDIM", "DDIMScheduler", {"timestep_spacing": "leading", "steps_offset": 1}),
    ("PLMS", "Automatic", "PNDMScheduler", {"skip_prk_steps": True}),
])
def test_a1111_to_diffusers_mapping(name, schedule, cls_name, expected):
    """The A1111 <-> diffusers table (diffusers docs, api/schedulers/overview)."""
    info, key = resolve(name, schedule)
    scheduler = make_scheduler(info, key, SD_CONFIG)
    assert type(scheduler).__name__ == cls_name
    for option, value in expected.items():
        assert scheduler.config[option] == value, option


def test_model_config_karras_is_switched_off_by_an_explicit_schedule():
    config = {**SD_CONFIG, "use_karras_sigmas": True}
    info, key = resolve("Euler", "Exponential")
    scheduler = make_scheduler(info, key, config)
    assert not scheduler.config.use_karras_sigmas and scheduler.config.use_exponential_sigmas
    info, key = resolve("Euler", "Automatic")
    assert make_scheduler(info, key, config).config.use_karras_sigmas  # Automatic keeps the model's


def test_importing_the_package_does_not_import_the_loop():
    import subprocess
    import sys

    code = ("import sys, malerei.engine.samplers as s; s.list_samplers(); "
            "print('torch' in sys.modules, 'malerei.engine.samplers.loop' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------------------------
# Schedules and the denoiser
# --------------------------------------------------------------------------------------------

TABLE = ModelSigmas.from_config(SD_CONFIG)


@pytest.mark.parametrize("schedule", [s.name for s in list_schedules() if s.name != "automatic"])
@pytest.mark.parametrize("n", [1, 4, 10, 25])
def test_k_schedules_shape(schedule, n):
    sigmas = sched.compute(schedule, n, TABLE)
    assert sigmas.dtype == torch.float32
    assert sigmas[-1] == 0 and torch.all(sigmas[:-1] > 0)
    assert torch.all(sigmas[1:] < sigmas[:-1]), "sigmas must decrease"
    assert sigmas[0] <= TABLE.sigma_max * 1.001 and sigmas[-2] >= TABLE.sigma_min * 0.99
    if schedule == "ddim":  # A1111's DDIM timesteps give extra steps where 1000 % n != 0
        assert len(sigmas) - 1 == len(range(1, 1000, 1000 // n))
    else:
        assert len(sigmas) == n + 1


def test_k_schedule_values():
    lo, hi = TABLE.sigma_min, TABLE.sigma_max
    assert lo == pytest.approx(0.0292, abs=1e-4) and hi == pytest.approx(14.6146, abs=1e-3)
    k = sched.karras(5, lo, hi)
    assert float(k[0]) == pytest.approx(hi, rel=1e-5) and float(k[-2]) == pytest.approx(lo, rel=1e-5)
    mid = (hi ** (1 / 7) + 0.5 * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    assert float(k[2]) == pytest.approx(mid, rel=1e-5)
    e = sched.exponential(5, lo, hi)
    ratios = e[1:-1] / e[:-2]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-4)
    assert torch.equal(sched.polyexponential(5, lo, hi), e)  # rho = 1
    u = sched.uniform(5, TABLE)  # timesteps 999, 749.25, 499.5, 249.75, 0
    assert float(u[0]) == pytest.approx(hi, rel=1e-5) and float(u[-2]) == pytest.approx(lo, rel=1e-5)
    assert float(u[2]) == pytest.approx(math.exp((_LOG_SIGMAS[499] + _LOG_SIGMAS[500]) / 2), rel=1e-4)
    ays = sched.align_your_steps(11)
    assert float(ays[0]) == pytest.approx(14.615) and float(ays[-2]) == pytest.approx(0.029)
    assert float(sched.align_your_steps(11, "sdxl")[1]) == pytest.approx(6.315)
    assert float(sched.simple(4, TABLE)[1]) == float(TABLE.sigmas[749])
    assert torch.equal(sched.ddim(4, TABLE)[:-1], TABLE.sigmas[[751, 501, 251, 1]])


def test_sigma_timestep_roundtrip():
    t = torch.tensor([0.0, 0.5, 10.25, 500.0, 998.9, 999.0])
    assert torch.allclose(TABLE.sigma_to_t(TABLE.t_to_sigma(t)), t, atol=1e-3)
    assert torch.allclose(TABLE.t_to_sigma(torch.tensor([10.0, 400.0])), TABLE.sigmas[[10, 400]], rtol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoiser_recovers_x0_from_an_exact_model(prediction_type):
    x0, eps = torch.full((1, 4, 8, 8), 0.3), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    denoiser = Denoiser(ExactModel(0.3, prediction_type=prediction_type), TABLE, prediction_type)
    for sigma in (14.0, 3.0, 0.5, 0.05):
        assert torch.allclose(denoiser(x0 + sigma * eps, sigma), x0, atol=1e-4)


def test_unsupported_prediction_type_is_refused():
    with pytest.raises(InvalidParameter, match="epsilon"):
        _run("DPM++ 2S a", model=ExactModel(0.5), config={**SD_CONFIG, "prediction_type": "flow_prediction"})


# --------------------------------------------------------------------------------------------
# Correctness on analytic data
# --------------------------------------------------------------------------------------------

# Samplers whose run ends at the model's smallest training noise level instead of 0, leaving
# sigma ~0.03 of noise in the result (as the stock scheduler / A1111 does).
_ENDS_AT_SIGMA_MIN = {"DDIM", "PLMS", "UniPC", "DEIS", "TCD"}


@pytest.mark.parametrize("config", [SD_CONFIG, V_CONFIG], ids=["epsilon", "v"])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_point_mass_data_is_reached(name, config):
    """With all data at c the exact denoiser is known; every sampler must end at c."""
    c = 0.7
    out = _run(name, model=ExactModel(c, prediction_type=config["prediction_type"]), config=config,
               steps=12, shape=(1, 32, 32))
    assert torch.isfinite(out).all()
    assert float(out.mean()) == pytest.approx(c, abs=2e-3)
    assert float(out.std()) < 0.04
    if name not in _ENDS_AT_SIGMA_MIN:
        assert float((out - c).abs().max()) < 2e-3


# Spread after 30 steps on Gaussian data, relative tolerance. First-order samplers shrink the
# spread at the coarse low-noise steps of SD's schedule (Euler: -3% at 40 steps, -6% at 20);
# LCM and TCD are left out: they are consistency-model samplers, and with an exact denoiser they
# return near-posterior means, not samples, by design.
_SPREAD_TOLERANCE = {name: 0.05 for name in ALL_NAMES if name not in ("LCM", "TCD")}
_SPREAD_TOLERANCE.update({"Euler": 0.1, "DDIM": 0.1, "Euler a": 0.12, "DDPM": 0.12, "DPM++ 3M SDE": 0.08})


@pytest.mark.parametrize("config", [SD_CONFIG, V_CONFIG], ids=["epsilon", "v"])
@pytest.mark.parametrize("name", list(_SPREAD_TOLERANCE))
def test_gaussian_data_distribution_is_reproduced(name, config):
    """Data N(mu, s^2) per element: the exact model's samples must have that mean and spread
    (ODE samplers map N(0, 1) onto it; ancestral / SDE samplers sample the same marginals).
    The mean tolerance covers the start: x_T = noise * sigma_max lacks the data mean, which
    the ODE samplers carry as a -mu / sigma_max (~ -0.02) bias."""
    mu, s = 0.3, 1.0
    model = ExactModel(mu, s, prediction_type=config["prediction_type"])
    out = _run(name, model=model, config=config, steps=30, shape=(1, 96, 96))
    assert float(out.mean()) == pytest.approx(mu, abs=0.04)
    assert float(out.std()) == pytest.approx(s, rel=_SPREAD_TOLERANCE[name])


@pytest.mark.parametrize("name", ["Euler", "DPM++ 2S a", "DDIM", "DPM++ 2M"])
def test_img2img_from_data_stays_on_data(name):
    """Starting from latents already on the data (a point mass), any strength must end there."""
    c = -0.4
    for strength in (0.3, 0.75):
        out = _run(name, model=ExactModel(c), steps=10, shape=(1, 16, 16),
                   init_latents=torch.full((1, 1, 16, 16), c), strength=strength)
        assert float(out.mean()) == pytest.approx(c, abs=3e-3)


# --------------------------------------------------------------------------------------------
# The loop's contracts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("steps", "strength", "expected"), [(10, 1.0, 10), (10, 0.5, 6), (20, 0.75, 16),
                                                            (10, 0.05, 1), (7, 0.3, 3), (1000, 1.0, 1000)])
def test_img2img_steps_is_a1111s_formula(steps, strength, expected):
    # A1111 setup_img2img_steps: t_enc = int(min(strength, 0.999) * steps); runs t_enc + 1 steps
    assert img2img_steps(steps, strength) == expected


@pytest.mark.parametrize(("name", "calls_per_step", "last_step_calls"),
                         [("Euler", 1, 1), ("DDIM", 1, 1), ("LMS", 1, 1), ("Heun", 2, 1), ("DPM++ 2S a", 2, 1)])
@pytest.mark.parametrize("strength", [0.3, 0.5, 1.0])
def test_strength_runs_fewer_steps(name, calls_per_step, last_step_calls, strength):
    steps = 10
    model = ExactModel(0.2)
    _run(name, model=model, steps=steps, shape=(1, 4, 4), init_latents=torch.full((1, 1, 4, 4), 0.2),
         strength=strength)
    n = int(min(strength, 0.999) * steps) + 1
    assert model.calls == (n - 1) * calls_per_step + last_step_calls


def test_img2img_starts_at_the_right_noise_level():
    """The first model call of img2img is at the schedule's step ``steps - n``."""
    from diffusers import EulerDiscreteScheduler

    model = ExactModel(0.2)
    _run("Euler", model=model, steps=10, shape=(1, 4, 4), init_latents=torch.zeros(1, 1, 4, 4), strength=0.5)
    reference = EulerDiscreteScheduler.from_config(SD_CONFIG)
    reference.set_timesteps(10)
    assert model.timesteps == [float(t) for t in reference.timesteps[10 - 6:]]

    model = ExactModel(0.2)
    _run("DPM++ 2S a", model=model, steps=10, shape=(1, 4, 4), init_latents=torch.zeros(1, 1, 4, 4), strength=0.5)
    karras = sched.karras(10, TABLE.sigma_min, TABLE.sigma_max)
    assert model.timesteps[0] == pytest.approx(float(TABLE.sigma_to_t(karras[4])), abs=1e-4)


def test_strength_without_init_latents_is_refused():
    with pytest.raises(InvalidParameter, match="img2img"):
        _run("Euler", model=ExactModel(0.0), strength=0.5)
    with pytest.raises(InvalidParameter, match="strength"):
        _run("Euler", model=ExactModel(0.0), init_latents=torch.zeros(1, 4, 8, 8), strength=1.5)
    with pytest.raises(InvalidParameter, match="steps"):
        _run("Euler", model=ExactModel(0.0), steps=0)


@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2S a", "Heun", "Restart"])
def test_cancel_stops_within_one_step(name):
    model = ExactModel(0.0)
    with pytest.raises(Cancelled):
        _run(name, model=model, steps=6, cancel=lambda: model.calls >= 2)
    assert model.calls == 2


@pytest.mark.parametrize("name", ["Euler", "Heun", "DPM++ 2S a", "Restart"])
def test_callback_reports_every_step(name):
    seen = []
    _run(name, model=ExactModel(0.1), steps=5, callback=lambda i, total, x, d: seen.append((i, total, d is None)))
    total = seen[0][1]
    assert [i for i, _, _ in seen] == list(range(total))
    assert all(t == total for _, t, _ in seen)
    assert total == (9 if name == "Heun" else 5)  # diffusers' Heun: 2 * steps - 1 scheduler calls
    if name != "Heun":
        assert not any(none for _, _, none in seen)  # denoised previews are there


@pytest.mark.parametrize("name", ["Euler", "DDIM", "DPM++ 2M", "DPM++ 2S a", "Euler a"])
def test_blend_keeps_the_masked_region(name):
    """Inpainting-style blend: the kept region, re-noised to each step's level, ends as the init."""
    init = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0  # left half: keep the init
    gens = _gens(5)
    noise = _noise(gens, (1, 8, 8))
    levels = []

    def blend(x, i, level):
        levels.append(level)
        return mask * level.noised(init, noise) + (1 - mask) * x

    out = sample(sampler=name, schedule="Automatic", steps=6, scheduler_config=SD_CONFIG, model_fn=ExactModel(1.0),
                 noise=noise, generators=gens, init_latents=init, strength=0.8, blend=blend)
    assert torch.equal(out[..., :4], init[..., :4])
    assert float((out[..., 4:] - 1.0).abs().mean()) < 0.05  # the rest is the model's data
    assert levels[-1].noised(init, noise) is init


# --------------------------------------------------------------------------------------------
# Real UNet: every sampler, reproducibility, batches, stock diffusers, threads
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_sampler_runs_and_reproduces(unet, name):
    model_fn, _, _ = _cfg_model(unet, batch=1)
    first = _run(name, model=model_fn, steps=3, seeds=(11,))
    again = _run(name, model=model_fn, steps=3, seeds=(11,))
    other = _run(name, model=model_fn, steps=3, seeds=(12,))
    assert first.shape == (1, 4, 8, 8)
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("name", ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE", "DPM++ 2S a",
                                  "Restart", "DDPM", "LCM"])
def test_batch_of_two_equals_each_alone(unet, name):
    model_fn, cond, uncond = _cfg_model(unet, batch=2)

    def single(j):
        def fn(x, t):
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond[j:j + 1], cond[j:j + 1]])).sample
            u, c = out.chunk(2)
            return u + 3.0 * (c - u)
        return fn

    both = _run(name, model=model_fn, steps=3, seeds=(21, 22))
    alone = torch.cat([_run(name, model=single(0), steps=3, seeds=(21,)),
                       _run(name, model=single(1), steps=3, seeds=(22,))])
    # A batched UNet call differs from single ones by float rounding (~1e-6 relative); the
    # random UNet's outputs are large, so compare relative to their size.
    assert float((both - alone).abs().max()) <= 1e-5 * float(alone.abs().max())


@pytest.mark.parametrize("name", ALL_NAMES)
def test_batch_of_two_equals_each_alone_exactly(name):
    """With an elementwise model nothing but the generators can couple the images: bit-equal."""
    model = ExactModel(0.2, 0.8)
    both = _run(name, model=model, steps=4, seeds=(21, 22))
    alone = torch.cat([_run(name, model=model, steps=4, seeds=(21,)), _run(name, model=model, steps=4, seeds=(22,))])
    assert torch.equal(both, alone)


@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE"])
def test_stochastic_samplers_use_the_generators(name):
    """Same initial noise, different per-step generators: different results."""
    base = _gens(1)
    noise = _noise(base, (1, 8, 8))
    outs = [sample(sampler=name, schedule="Automatic", steps=4, scheduler_config=SD_CONFIG,
                   model_fn=ExactModel(0.0, 0.5), noise=noise, generators=_gens(seed)) for seed in (5, 5, 6)]
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])


def _schedule_cases():
    cases = [(name, "Automatic") for name in DIFFUSERS_NAMES]
    for name in ("Euler", "DPM++ 2M SDE", "UniPC", "DDIM"):
        cases.extend((name, s) for s in ("karras", "sgm_uniform", "ddim") if s in find_sampler(name).schedules)
    return cases


@pytest.mark.parametrize(("name", "schedule"), _schedule_cases())
def test_diffusers_samplers_match_a_stock_pipeline(unet, name, schedule):
    """Hard requirement: our loop gives exactly the latents of StableDiffusionPipeline with the
    same scheduler, generators and initial latents."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.torch_utils import randn_tensor

    model_fn, cond, uncond = _cfg_model(unet, batch=2)
    info, key = resolve(name, schedule)
    seeds = (31, 32)

    gens = _gens(*seeds)
    ours = sample(sampler=name, schedule=schedule, steps=4, scheduler_config=SD_CONFIG, model_fn=model_fn,
                  noise=randn_tensor((2, 4, 8, 8), generator=gens), generators=gens)

    stock_gens = _gens(*seeds)
    stock_noise = randn_tensor((2, 4, 8, 8), generator=stock_gens)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=make_scheduler(info, key, SD_CONFIG, stock_gens),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=64, width=64, num_inference_steps=4,
                 guidance_scale=3.0, generator=stock_gens, latents=stock_noise, output_type="latent",
                 eta=info.step_kwargs.get("eta", 0.0)).images
    assert torch.equal(ours, stock)


def test_parallel_threads_equal_sequential_runs(unet):
    jobs = [("Euler a", 41), ("DPM++ 2S a", 42), ("DPM++ SDE", 43), ("DPM++ 2M", 44)]

    def run(name, seed):
        model_fn, _, _ = _cfg_model(unet, batch=1, seed=seed)
        return _run(name, model=model_fn, steps=4, seeds=(seed,))

    sequential = [run(*job) for job in jobs]
    parallel: dict[int, torch.Tensor] = {}
    errors = []

    def worker(k):
        try:
            parallel[k] = run(*jobs[k])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k in range(len(jobs)):
        assert torch.equal(parallel[k], sequential[k]), jobs[k][0]


def test_scheduler_config_is_not_modified():
    config = dict(SD_CONFIG)
    for name in ("DPM++ 2M", "DPM++ SDE", "DPM++ 2S a", "UniPC"):
        _run(name, model=ExactModel(0.0), config=config)
    assert config == SD_CONFIG
