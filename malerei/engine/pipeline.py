"""``generate(model, params)``: text to image, the numbered pipeline body.

The body follows the diffusers Stable Diffusion pipelines step by step, so that with a sampler
that is a diffusers scheduler ("Euler", "DDIM", "DPM++ 2M", ...) malerei's image equals
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` on the same weights, prompt, seed
and scheduler config. Around it comes what A1111 users expect: prompt weights, LoRA tags and
embeddings, batch seeds ``s..s+N-1``, variation seeds, A1111 infotext and a malerei recipe.

1. Check inputs: every parameter is resolved (model defaults filled in, random seed picked)
   and checked; a bad one raises :class:`InvalidParameter` saying what is allowed.
2. Encode prompt: A1111 prompt syntax via :mod:`malerei.engine.prompts`; ``<lora:...>`` tags
   are applied to the model for the duration of the job (see "Thread safety").
3. Noise: one CPU generator per image (:mod:`malerei.engine.noise`), drawn like diffusers'
   ``prepare_latents`` with ``torch.Generator("cpu").manual_seed(seed)``.
4. Sample (:func:`malerei.engine.samplers.sample`) with :class:`GuidedUNet`: classifier-free
   guidance as ONE batched UNet call per step (``[uncond; cond]``), the uncond half skipped
   when ``cfg == 1``; SDXL added conditions (time ids from the size, pooled text embeds);
   guidance rescale when asked for (params or the model's defaults).
5. Decode with the VAE (``scaling_factor``, ``shift_factor``, SDXL ``latents_mean/std``; a
   float16 VAE that sets ``force_upcast`` decodes in float32, as diffusers does).
6. PIL images, A1111 infotext and malerei recipe per image.

Progress and previews: ``progress(step, total, latents_or_None)`` is called after every step.
Every ``preview_every`` steps (default: every step; 0: never) the third argument is a latent
batch to preview: the sampler's current estimate of the clean latents where it gives one (a
much better picture than the noisy latents), else the current latents. Handing over the tensor
costs nothing; :func:`preview_images` turns it into small RGB images (latent resolution) with
a linear latent->RGB map fitted once per VAE on first use (:func:`preview_map`), so a preview
never runs the decoder and works for any latent space.

Thread safety: each call builds its own scheduler/sampler state and generators. A plain job
holds the model's guard shared, so plain jobs may run in parallel threads. A job that changes
the model (LoRA tags; the float16 VAE upcast) takes ``model.lock`` and then the guard
exclusively, so it never runs while another job uses the model, and no job sees its LoRA.

Extending to img2img / inpainting: :func:`run_job` takes ``init_latents`` + ``strength`` (the
sampler starts from the init latents noised to A1111's first img2img step) and a ``blend(x,
step_index, level) -> x`` hook called after each step (paste back the known region).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import weakref
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from malerei.engine.errors import Cancelled, InvalidParameter, ModelLoadError

if TYPE_CHECKING:
    import PIL.Image
    import torch

    from malerei.engine.loading import LoadedModel
    from malerei.engine.prompts import PromptEmbeds

# Parameter bounds, checked in step 1.
MIN_SIDE, MAX_SIDE = 16, 4096
MAX_STEPS = 150
MAX_CFG = 30.0
MAX_BATCH = 64
MAX_CLIP_SKIP = 12
# Used when neither the params nor the model's defaults (malerei.json) say otherwise.
FALLBACK_DEFAULTS = {"sampler": "Euler", "scheduler": "Automatic", "steps": 20, "cfg_scale": 7.0}

ProgressFn = Callable[[int, int, Any], None]


@dataclass(frozen=True, kw_only=True)
class GenerationParams:
    """What a user asks for. ``None`` means "the model's default" (its malerei.json)."""

    prompt: str
    negative_prompt: str = ""
    sampler: str | None = None  # A1111 sampler name ("Euler a", "DPM++ 2M", ...); None -> model default
    scheduler: str | None = "Automatic"  # A1111 "Schedule type" ("Karras", ...); None -> model default
    steps: int | None = None
    cfg_scale: float | None = None
    seed: int = -1  # negative: pick one at random (recorded in the result)
    subseed: int = -1  # A1111 "Variation seed"; negative: random, when subseed_strength > 0
    subseed_strength: float = 0.0  # A1111 "Variation strength", 0..1
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    clip_skip: int | None = None  # A1111 "Clip skip": 1 = last layer; None -> model default or 1
    guidance_rescale: float | None = None  # 0..1, arXiv:2305.08891 sec. 3.4; None -> model default or 0


@dataclass
class GeneratedImage:
    image: PIL.Image.Image
    seed: int
    infotext: str  # A1111 "parameters" text
    recipe: dict  # malerei JSON recipe: everything needed to make this image again


@dataclass(frozen=True, kw_only=True)
class ResolvedParams:
    """:class:`GenerationParams` with every default filled in and every value checked."""

    prompt: str
    negative_prompt: str
    sampler: str  # A1111's canonical name ("DPM++ 2M")
    scheduler: str  # A1111's label of the schedule that runs ("Karras"; "Automatic": the model config's)
    steps: int
    cfg_scale: float
    seed: int
    subseed: int | None  # None unless a variation strength > 0 is used
    subseed_strength: float
    width: int
    height: int
    batch_size: int
    clip_skip: int
    guidance_rescale: float

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.batch_size)]

    def for_image(self, index: int) -> ResolvedParams:
        """The params of image ``index`` of this batch on its own."""
        subseed = None if self.subseed is None else self.subseed + index
        return dataclasses.replace(self, seed=self.seed + index, subseed=subseed, batch_size=1)

    def to_params(self) -> GenerationParams:
        """Back to request form (to run the same job again)."""
        return GenerationParams(
            prompt=self.prompt, negative_prompt=self.negative_prompt, sampler=self.sampler,
            scheduler=self.scheduler, steps=self.steps, cfg_scale=self.cfg_scale, seed=self.seed,
            subseed=-1 if self.subseed is None else self.subseed, subseed_strength=self.subseed_strength,
            width=self.width, height=self.height, batch_size=self.batch_size, clip_skip=self.clip_skip,
            guidance_rescale=self.guidance_rescale,
        )


# ---------------------------------------------------------------------------------------------
# 1. Check inputs


def module_dtype(module):
    """The dtype of a module's weights. diffusers' ``ModelMixin.dtype`` walks every submodule
    (looking for offload hooks) on each access; the first parameter says the same for a loaded
    model and costs nothing."""
    return next(module.parameters()).dtype


_DEVICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def execution_device(pipe):
    """``pipe._execution_device`` (where the latents go: the GPU also under CPU offload),
    remembered per pipeline and per place of the UNet's weights, since computing it walks every
    module of every component."""
    where = (next(pipe.unet.parameters()).device, hasattr(pipe.unet, "_hf_hook"))
    known = _DEVICES.get(pipe)
    if known is None or where not in known:
        known = dict(known or {})
        known[where] = pipe._execution_device
        _DEVICES[pipe] = known
    return known[where]


def vae_scale_factor(pipe) -> int:
    """Pixels per latent pixel (8 for SD; 2 ** (VAE levels - 1) in general)."""
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def _native_side(pipe) -> int:
    size = pipe.unet.config.sample_size
    return int(size if isinstance(size, int) else size[0]) * vae_scale_factor(pipe)


def _default(model: LoadedModel, key: str, fallback):
    value = (getattr(model, "defaults", None) or {}).get(key)
    return fallback if value is None else value


def _check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameter(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise InvalidParameter(f"{name} {value} is out of range; allowed: {low}..{high}")
    return value


def _check_float(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidParameter(f"{name} must be a number, got {value!r}")
    if not low <= value <= high:
        raise InvalidParameter(f"{name} {value:g} is out of range; allowed: {low:g}..{high:g}")
    return float(value)


def check_size(width, height, multiple: int = 8) -> None:
    """Width and height: whole numbers in MIN_SIDE..MAX_SIDE, multiples of ``multiple``."""
    for name, value in (("width", width), ("height", height)):
        _check_int(name, value, MIN_SIDE, MAX_SIDE)
        if value % multiple:
            raise InvalidParameter(f"{name} {value} is not a multiple of {multiple}; "
                                   f"allowed: multiples of {multiple} from {MIN_SIDE} to {MAX_SIDE}")


def check_request(params: GenerationParams) -> None:
    """The checks that need no model (the CLI and the service run them before loading one).

    Values left to the model's defaults (``None``) are checked later, by :func:`resolve_params`.
    """
    from malerei.engine import noise, prompts, samplers

    if not isinstance(params, GenerationParams):
        raise InvalidParameter(f"params must be GenerationParams, got {type(params).__name__}")
    prompts.validate_prompt(params.prompt)
    prompts.validate_prompt(params.negative_prompt, what="negative prompt")
    if params.width is not None or params.height is not None:
        check_size(params.width if params.width is not None else 64,
                   params.height if params.height is not None else 64)
    if params.steps is not None:
        _check_int("steps", params.steps, 1, MAX_STEPS)
    if params.cfg_scale is not None:
        _check_float("cfg scale", params.cfg_scale, 0.0, MAX_CFG)
    batch = _check_int("batch size", params.batch_size, 1, MAX_BATCH)
    if params.clip_skip is not None:
        _check_int("clip skip", params.clip_skip, 1, MAX_CLIP_SKIP)
    if params.guidance_rescale is not None:
        _check_float("guidance rescale", params.guidance_rescale, 0.0, 1.0)
    strength = _check_float("variation strength", params.subseed_strength, 0.0, 1.0)
    if params.sampler:
        samplers.resolve(params.sampler, params.scheduler or "Automatic")
    elif params.scheduler:
        samplers.find_schedule(params.scheduler)
    noise.resolve_seed(params.subseed)  # type and range; negative means random
    if noise.resolve_seed(params.seed) == params.seed:
        noise.batch_seeds(params.seed, batch)
    if strength > 0 and params.subseed >= 0:
        noise.batch_seeds(params.subseed, batch)


def resolve_params(model: LoadedModel, params: GenerationParams) -> ResolvedParams:
    """Step 1: fill in model defaults, pick random seeds where asked, check every value."""
    from malerei.engine import noise, samplers

    check_request(params)
    pipe = model.pipe
    side = _native_side(pipe)
    width = params.width if params.width is not None else _default(model, "width", side)
    height = params.height if params.height is not None else _default(model, "height", side)
    check_size(width, height, max(8, vae_scale_factor(pipe)))
    steps = _check_int("steps", params.steps if params.steps is not None
                       else _default(model, "steps", FALLBACK_DEFAULTS["steps"]), 1, MAX_STEPS)
    cfg = _check_float("cfg scale", params.cfg_scale if params.cfg_scale is not None
                       else _default(model, "cfg_scale", FALLBACK_DEFAULTS["cfg_scale"]), 0.0, MAX_CFG)
    batch = params.batch_size
    clip_skip = _check_int("clip skip", params.clip_skip if params.clip_skip is not None
                           else _default(model, "clip_skip", 1), 1, MAX_CLIP_SKIP)
    rescale = _check_float("guidance rescale", params.guidance_rescale if params.guidance_rescale is not None
                           else _default(model, "guidance_rescale", 0.0), 0.0, 1.0)
    strength = float(params.subseed_strength)
    # An empty/None schedule type means the model's default; "Automatic" is the sampler's default.
    sampler_name = params.sampler or _default(model, "sampler", FALLBACK_DEFAULTS["sampler"])
    schedule_name = params.scheduler or _default(model, "scheduler", FALLBACK_DEFAULTS["scheduler"])
    info, schedule_key = samplers.resolve(sampler_name, schedule_name)

    seed = noise.resolve_seed(params.seed)
    noise.batch_seeds(seed, batch)  # the batch's last seed must be valid too
    subseed = None
    if strength > 0:
        subseed = noise.resolve_seed(params.subseed)
        noise.batch_seeds(subseed, batch)
    return ResolvedParams(
        prompt=params.prompt, negative_prompt=params.negative_prompt, sampler=info.name,
        scheduler=samplers.schedule_label(schedule_key), steps=steps, cfg_scale=cfg, seed=seed,
        subseed=subseed, subseed_strength=strength if subseed is not None else 0.0,
        width=width, height=height, batch_size=batch, clip_skip=clip_skip, guidance_rescale=rescale,
    )


# ---------------------------------------------------------------------------------------------
# The model guard: shared for plain jobs, exclusive for jobs that change the model.


class ModelGuard:
    """A readers-writer lock: many plain jobs at once, or one job that mutates the model."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def shared(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


_GUARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_GUARDS_LOCK = threading.Lock()


def model_guard(model: LoadedModel) -> ModelGuard:
    """The guard of ``model``'s pipeline (created on first use, lives as long as the pipeline)."""
    with _GUARDS_LOCK:
        guard = _GUARDS.get(model.pipe)
        if guard is None:
            guard = _GUARDS[model.pipe] = ModelGuard()
        return guard


@contextmanager
def hold_model(model: LoadedModel, *, mutates: bool):
    if not mutates:
        with model_guard(model).shared():
            yield
        return
    # model.lock first, then the guard: a caller that already holds model.lock (reentrant)
    # and runs a plain job inside cannot deadlock against a waiting mutating job.
    lock = getattr(model, "lock", None)
    with ExitStack() as stack:
        if lock is not None:
            stack.enter_context(lock)
        stack.enter_context(model_guard(model).exclusive())
        yield


# ---------------------------------------------------------------------------------------------
# 2. Encode prompt


def _loras_and_texts(job: ResolvedParams) -> tuple[str, str, list[tuple[str, float]]]:
    from malerei.engine.prompts import extract_lora_tags

    prompt, loras = extract_lora_tags(job.prompt)
    return prompt, job.negative_prompt, loras


def _text_components(pipe, family: str) -> tuple[list, list]:
    if family == "sdxl":
        return [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
    return [pipe.tokenizer], [pipe.text_encoder]


def encode(model: LoadedModel, prompt: str, negative_prompt: str, *, batch_size: int, clip_skip: int,
           device, embeddings=None) -> PromptEmbeds:
    """Step 2: the prompt and negative prompt, A1111's way, one row per image."""
    from malerei.engine.prompts import encode_prompts

    tokenizers, encoders = _text_components(model.pipe, model.family)
    return encode_prompts(
        tokenizers=tokenizers, text_encoders=encoders, family=model.family,
        prompts=[prompt] * batch_size, negative_prompts=[negative_prompt] * batch_size,
        clip_skip=clip_skip, embeddings=embeddings, device=device,
    )


def _models_dir(model: LoadedModel, models_dir: Path | None) -> Path:
    """Where LoRAs and embeddings are looked up: the argument, the model's, or the default."""
    if models_dir is not None:
        return Path(models_dir)
    own = getattr(model, "models_dir", None)
    if own is not None:
        return Path(own)
    from malerei.engine.model_dir import default_models_dir

    return default_models_dir()


def folder_has_embeddings(models_dir: Path) -> bool:
    from malerei.engine.model_dir import list_embedding_files

    return bool(list_embedding_files(models_dir))


@contextmanager
def _loras_applied(model: LoadedModel, loras, models_dir: Path):
    if not loras:
        yield
        return
    from malerei.engine.lora import lora_applied

    with lora_applied(model, loras, models_dir=models_dir):
        yield


def _embeddings(model: LoadedModel, models_dir: Path) -> dict:
    """Textual-inversion embeddings of the models folder that fit ``model`` (word -> vectors)."""
    from malerei.engine.embeddings import load_embeddings_for

    if not folder_has_embeddings(models_dir):
        return {}
    return load_embeddings_for(model, models_dir=models_dir,
                               allow_pickle=bool(getattr(model, "allow_pickle", False))).vectors


# ---------------------------------------------------------------------------------------------
# 4. Sample: the guided model call


def sdxl_time_ids(width: int, height: int) -> list[int]:
    """SDXL micro-conditioning: original size, crop top-left (0, 0), target size, as (h, w)."""
    return [height, width, 0, 0, height, width]


class GuidedUNet:
    """``model_fn(x, t)`` for the samplers: the UNet with classifier-free guidance,
    ``uncond + scale * (cond - uncond)``.

    One UNet call per step for the whole batch: ``[x; x]`` against ``[uncond; cond]`` (the order
    diffusers uses), or only ``x`` against ``cond`` when ``scale == 1``, where the guided result
    equals the conditional one.
    """

    def __init__(self, unet, embeds: PromptEmbeds, *, cfg_scale: float, guidance_rescale: float = 0.0,
                 time_ids: list[int] | None = None) -> None:
        import torch

        self.unet = unet
        self.cfg_scale = cfg_scale
        self.guidance_rescale = guidance_rescale
        self.do_cfg = cfg_scale != 1.0
        dtype = module_dtype(unet)
        if self.do_cfg:
            self.hidden = torch.cat([embeds.uncond, embeds.cond]).to(dtype)
        else:
            self.hidden = embeds.cond.to(dtype)
        self.added = None
        if embeds.cond_pooled is not None:
            if time_ids is None:
                raise ValueError("an SDXL model needs time ids")
            pooled = torch.cat([embeds.uncond_pooled, embeds.cond_pooled]) if self.do_cfg else embeds.cond_pooled
            ids = torch.tensor([time_ids], dtype=embeds.cond.dtype, device=pooled.device)
            self.added = {"text_embeds": pooled.to(dtype), "time_ids": ids.repeat(pooled.shape[0], 1).to(dtype)}

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        import torch

        model_in = torch.cat([x, x]) if self.do_cfg else x
        out = self.unet(model_in, t, encoder_hidden_states=self.hidden, added_cond_kwargs=self.added,
                        return_dict=False)[0]
        if not self.do_cfg:
            return out
        out_uncond, out_cond = out.chunk(2)
        guided = out_uncond + self.cfg_scale * (out_cond - out_uncond)
        if self.guidance_rescale > 0:
            guided = rescale_guidance(guided, out_cond, self.guidance_rescale)
        return guided


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, factor: float) -> torch.Tensor:
    """Lin et al. 2023 (arXiv:2305.08891) sec. 3.4: match the guided output's std to the
    conditional one's, mixed by ``factor`` (diffusers' ``rescale_noise_cfg``)."""
    dims = list(range(1, cond.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return factor * rescaled + (1 - factor) * guided


def _check_sdxl_added_dims(pipe) -> None:
    config = pipe.unet.config
    expected = pipe.unet.add_embedding.linear_1.in_features
    pooled = pipe.text_encoder_2.config.projection_dim
    passed = config.addition_time_embed_dim * 6 + pooled
    if expected != passed:
        raise ModelLoadError(
            f"this SDXL UNet expects {expected} added-condition features but size/crop time ids and "
            f"pooled text give {passed}; refiner-style (aesthetic score) models are not supported")


# ---------------------------------------------------------------------------------------------
# 5. Decode


def pil_to_tensor(images, *, width: int, height: int) -> torch.Tensor:
    """PIL images (resized to ``width`` x ``height`` with Lanczos if needed) -> a batch in [-1, 1]."""
    import numpy as np
    import PIL.Image
    import torch

    rows = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), PIL.Image.Resampling.LANCZOS)
        rows.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    return torch.stack(rows)


def encode_latents(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> latents scaled like sampled ones (the inverse of :func:`decode`'s
    normalisation), using the posterior mean, so an init image gives the same latents every
    time. For img2img / inpainting jobs: pass the result to :func:`run_job` as ``init_latents``."""
    import torch

    vae = pipe.vae
    param = next(vae.parameters())
    upcast = needs_vae_upcast(pipe)
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        dtype = torch.float32 if upcast else param.dtype
        raw = vae.encode(pixels.to(param.device, dtype), return_dict=True).latent_dist.mean
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
    return normalise_latents(vae, raw)


def normalise_latents(vae, raw: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the sampler's scaling (the inverse of :func:`decode`'s normalisation)."""
    import torch

    config = vae.config
    mean = getattr(config, "latents_mean", None)
    std = getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, raw.shape[1], 1, 1)
        mean_t = torch.tensor(mean).view(shape).to(raw.device, raw.dtype)
        std_t = torch.tensor(std).view(shape).to(raw.device, raw.dtype)
        return (raw - mean_t) * config.scaling_factor / std_t
    shift = getattr(config, "shift_factor", None) or 0.0
    return (raw - shift) * config.scaling_factor


def _unnormalise(vae, latents: torch.Tensor) -> torch.Tensor:
    import torch

    config = vae.config
    mean = getattr(config, "latents_mean", None)
    std = getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, latents.shape[1], 1, 1)
        mean_t = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
        std_t = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
        return latents * std_t / config.scaling_factor + mean_t
    latents = latents / config.scaling_factor
    shift = getattr(config, "shift_factor", None)
    return latents + shift if shift else latents


def needs_vae_upcast(pipe) -> bool:
    import torch

    return module_dtype(pipe.vae) == torch.float16 and bool(getattr(pipe.vae.config, "force_upcast", False))


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Step 5: latents -> images in [-1, 1]. A float16 VAE with ``force_upcast`` decodes in
    float32 (it overflows in float16), as diffusers does; callers hold the model exclusively."""
    import torch

    vae = pipe.vae
    if needs_vae_upcast(pipe):
        vae.to(dtype=torch.float32)
        try:
            return vae.decode(_unnormalise(vae, latents.float()), return_dict=False)[0]
        finally:
            vae.to(dtype=torch.float16)
    return vae.decode(_unnormalise(vae, latents).to(module_dtype(vae)), return_dict=False)[0]


def to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """Images in [-1, 1] -> 8-bit PIL images, rounding as diffusers' ``numpy_to_pil``."""
    import PIL.Image
    import torch

    pixels = ((images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float() * 255).round()
    return [PIL.Image.fromarray(a) for a in pixels.to(device="cpu", dtype=torch.uint8).numpy()]


# ---------------------------------------------------------------------------------------------
# Previews


_PREVIEW_MAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PREVIEW_LOCK = threading.Lock()


def preview_map(pipe) -> torch.Tensor:
    """A ``(C + 1, 3)`` matrix from a latent pixel (plus a bias 1) to RGB in [-1, 1], per VAE.

    Fitted once per VAE by least squares: twelve test cards (flat colours and two-colour
    splits, 8 latent pixels square) are encoded (posterior mean, normalised like sampled
    latents) and decoded; the map takes each latent pixel to the average colour the decoder
    paints over it. One small encode + decode on first use, then a tiny matrix product per
    preview. Works for any latent space; as good as a linear map can be (A1111's "Approx
    cheap" is the same idea with fixed coefficients for SD1/SDXL).
    """
    import torch

    with _PREVIEW_LOCK:
        cached = _PREVIEW_MAPS.get(pipe.vae)
    if cached is not None:
        return cached
    vae = pipe.vae
    factor = vae_scale_factor(pipe)
    side = 8 * factor
    g = torch.Generator().manual_seed(0)
    cards = (torch.rand(12, 3, 1, 1, generator=g) * 2 - 1).expand(12, 3, side, side).clone()
    cards[6:, :, :, side // 2:] = torch.rand(6, 3, 1, 1, generator=g) * 2 - 1
    with torch.inference_mode():
        param = next(vae.parameters())
        raw = vae.encode(cards.to(param.device, param.dtype)).latent_dist.mean
        decoded = vae.decode(raw, return_dict=False)[0].float().cpu()
        raw = raw.float().cpu()
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1)
        latents = (raw - mean) * config.scaling_factor / std
    else:
        latents = (raw - (getattr(config, "shift_factor", None) or 0.0)) * config.scaling_factor
    targets = torch.nn.functional.avg_pool2d(decoded.clamp(-1, 1), factor)
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    y = targets.permute(0, 2, 3, 1).reshape(-1, 3)
    matrix = torch.linalg.lstsq(x, y).solution
    with _PREVIEW_LOCK:
        _PREVIEW_MAPS[pipe.vae] = matrix
    return matrix


def preview_images(pipe, latents: torch.Tensor) -> list[PIL.Image.Image]:
    """Cheap previews of a latent batch: one small RGB image (latent resolution) per latent."""
    import torch

    matrix = preview_map(pipe)
    x = latents.detach().float().cpu().permute(0, 2, 3, 1)
    rgb = torch.cat([x, torch.ones(*x.shape[:-1], 1)], dim=-1) @ matrix
    return to_pil(rgb.permute(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------
# 6. Infotext and recipe


def infotext_fields(model: LoadedModel, job: ResolvedParams) -> dict:
    """A1111 infotext fields in A1111's order (after the prompt and negative prompt lines)."""
    fields: dict[str, Any] = {
        "Steps": job.steps,
        "Sampler": job.sampler,
        "Schedule type": job.scheduler,
        "CFG scale": job.cfg_scale,
        "Seed": job.seed,
        "Size": f"{job.width}x{job.height}",
        "Model hash": model.short_hash,
        "Model": model.name,
    }
    if job.subseed is not None:
        fields["Variation seed"] = job.subseed
        fields["Variation seed strength"] = job.subseed_strength
    if job.clip_skip != 1:
        fields["Clip skip"] = job.clip_skip
    if job.guidance_rescale:
        fields["Guidance rescale"] = job.guidance_rescale
    return fields


def _file_records(kind: str, names_weights, folder: Path) -> list[dict]:
    """name, weight, file and A1111 short hash of each LoRA / embedding used (for the recipe)."""
    if not names_weights:
        return []
    from malerei.engine.model_dir import hash_cache, resolve_lora, short_hash

    cache = hash_cache(folder)
    records = []
    for name, weight, path in names_weights:
        if path is None and kind == "lora":
            path = resolve_lora(name, folder)
        record = {"name": name, "weight": weight, "file": None, "short_hash": None}
        if path is not None:
            record["file"] = Path(path).name
            record["short_hash"] = short_hash(cache.sha256(Path(path)))
        records.append(record)
    return records


def build_recipe(model: LoadedModel, job: ResolvedParams, index: int, *, device, dtype,
                 loras=(), embeddings=(), kind: str = "txt2img") -> dict:
    """The malerei recipe of image ``index`` of the batch ``job``.

    ``params`` makes this image alone; ``batch`` names the batch it came from, which is what
    reproduces its pixels exactly (a batched UNet call may differ from a single one in the last
    bits of float arithmetic).
    """
    from malerei.engine import metadata

    recipe = metadata.build_recipe(
        params=dataclasses.asdict(job.for_image(index)), model_name=model.name, model_family=model.family,
        model_hash=model.short_hash, file_hashes=model.file_hashes, device=device, dtype=dtype,
        loras=loras, embeddings=embeddings,
    )
    recipe["kind"] = kind
    recipe["batch"] = {"seed": job.seed, "subseed": job.subseed, "size": job.batch_size, "index": index}
    recipe["model"]["path"] = str(model.path)
    recipe["model"]["prediction_type"] = model.prediction_type
    return recipe


def format_infotext(model: LoadedModel, job: ResolvedParams, *, loras=(), embeddings=()) -> str:
    """A1111 infotext of one image (``job`` is that image's own params)."""
    from malerei.engine import metadata

    fields = infotext_fields(model, job)
    if loras:
        fields["Lora hashes"] = {r["name"]: r["short_hash"] for r in loras if r["short_hash"]}
    if embeddings:
        fields["TI hashes"] = {r["name"]: r["short_hash"] for r in embeddings if r["short_hash"]}
    return metadata.format_infotext(prompt=job.prompt, negative_prompt=job.negative_prompt, params=fields)


# ---------------------------------------------------------------------------------------------
# The body


def generate(
    model: LoadedModel,
    params: GenerationParams,
    *,
    progress: ProgressFn | None = None,
    cancel: Callable[[], bool] | None = None,
    preview_every: int = 1,
    models_dir: Path | None = None,
) -> list[GeneratedImage]:
    """Text to image: one :class:`GeneratedImage` per image of the batch, in seed order.

    ``progress(step, total, latents_or_None)`` after every sampler step (``step`` from 1);
    the latents come every ``preview_every`` steps (0: never), see the module docstring.
    ``cancel()`` is checked before every model call; when true the job stops with
    :class:`Cancelled`. ``models_dir`` is where ``<lora:name>`` tags and embeddings are found
    (default: the user's models folder).
    """
    # 1. Check inputs
    job = resolve_params(model, params)
    return run_job(model, job, progress=progress, cancel=cancel, preview_every=preview_every,
                   models_dir=models_dir)


def run_job(
    model: LoadedModel,
    job: ResolvedParams,
    *,
    progress: ProgressFn | None = None,
    cancel: Callable[[], bool] | None = None,
    preview_every: int = 1,
    models_dir: Path | None = None,
    init_latents: torch.Tensor | None = None,
    strength: float = 1.0,
    blend: Callable | None = None,
    kind: str = "txt2img",
) -> list[GeneratedImage]:
    """Steps 2-6 for resolved params. ``init_latents`` (scaled like sampled latents, one row per
    image), ``strength`` and ``blend`` are for img2img / inpainting jobs built on this body."""
    import torch

    from malerei.engine import noise, samplers

    if isinstance(preview_every, bool) or not isinstance(preview_every, int) or preview_every < 0:
        raise InvalidParameter(f"preview_every must be a whole number >= 0, got {preview_every!r}")
    pipe = model.pipe
    device = execution_device(pipe)
    dtype = module_dtype(pipe.unet)
    if model.family == "sdxl":
        _check_sdxl_added_dims(pipe)
    prompt, negative, loras = _loras_and_texts(job)
    folder = _models_dir(model, models_dir)
    stop = cancel if cancel is not None else (lambda: False)
    if stop():
        raise Cancelled("generation cancelled")

    def on_step(i: int, total: int, x, denoised) -> None:
        if progress is None:
            return
        show = preview_every and ((i + 1) % preview_every == 0 or i + 1 == total)
        progress(i + 1, total, (denoised if denoised is not None else x) if show else None)

    mutates = bool(loras) or needs_vae_upcast(pipe)
    with torch.inference_mode(), hold_model(model, mutates=mutates), _loras_applied(model, loras, folder):
        # 2. Encode prompt
        embeds = encode(model, prompt, negative, batch_size=job.batch_size, clip_skip=job.clip_skip,
                        device=device, embeddings=_embeddings(model, folder))
        time_ids = sdxl_time_ids(job.width, job.height) if model.family == "sdxl" else None
        model_fn = GuidedUNet(pipe.unet, embeds, cfg_scale=job.cfg_scale,
                              guidance_rescale=job.guidance_rescale, time_ids=time_ids)

        # 3. Noise
        factor = vae_scale_factor(pipe)
        shape = (pipe.unet.config.in_channels, job.height // factor, job.width // factor)
        streams = noise.ImageNoise.for_batch(job.seed, job.batch_size, subseed=job.subseed,
                                             subseed_strength=job.subseed_strength)
        start = streams.initial(shape, device=device, dtype=embeds.cond.dtype)
        if init_latents is not None:
            init_latents = init_latents.to(device=device, dtype=start.dtype)
            if init_latents.shape[0] == 1 and job.batch_size > 1:
                init_latents = init_latents.expand(job.batch_size, -1, -1, -1)
            if init_latents.shape != start.shape:
                raise InvalidParameter(f"init latents of shape {tuple(init_latents.shape)} do not fit a "
                                       f"{job.width}x{job.height} batch of {job.batch_size}")

        # 4. Sample
        latents = samplers.sample(
            sampler=job.sampler, schedule=job.scheduler, steps=job.steps,
            scheduler_config=dict(pipe.scheduler.config), model_fn=model_fn, noise=start,
            generators=streams.generators, init_latents=init_latents, strength=strength, blend=blend,
            callback=on_step, cancel=cancel, model_family=model.family,
        )

        # 5. Decode
        images = decode(pipe, latents)

    # 6. Images, infotext, recipe
    lora_records = _file_records("lora", [(name, weight, None) for name, weight in loras], folder)
    embedding_records = _file_records("embedding", _used_embedding_files(embeds.used_embeddings, folder), folder)
    results = []
    for i, image in enumerate(to_pil(images)):
        own = job.for_image(i)
        recipe = build_recipe(model, job, i, device=device, dtype=dtype, loras=lora_records,
                              embeddings=embedding_records, kind=kind)
        infotext = format_infotext(model, own, loras=lora_records, embeddings=embedding_records)
        results.append(GeneratedImage(image=image, seed=own.seed, infotext=infotext, recipe=recipe))
    return results


def _used_embedding_files(names, folder: Path) -> list[tuple[str, None, Path | None]]:
    if not names:
        return []
    from malerei.engine.model_dir import list_embedding_files

    files = {e.name: e.path for e in list_embedding_files(folder)}
    return [(name, None, files.get(name)) for name in names]
