"""Changing images: img2img, inpainting, outpainting and the hires fix, on :func:`pipeline.run_job`.

All four are the text-to-image body with a starting image (``init_latents`` + ``strength``) and,
for inpainting, a per-step ``blend`` that puts the known region back:

- :func:`img2img`: the image (resized by an A1111 resize mode) is encoded with the VAE and
  sampled from A1111's img2img step: denoising strength s runs the last ``int(s * steps) + 1``
  steps of the full schedule (:func:`malerei.engine.samplers.img2img_steps`).
- :func:`inpaint`: a mask (white = repaint) from a black/white image or the image's alpha
  channel; A1111's mask blur, "only masked" (the mask's bounding box plus padding, grown to the
  processing aspect, worked on at full processing resolution and pasted back) and masked content
  modes ("original", "fill", "latent noise", "latent nothing"). With a plain 4-channel UNet the
  latents outside the mask are replaced after every step by the init latents noised to that
  step's level (``level.noised(init, noise)``, as diffusers' inpaint pipeline does); a
  9-channel inpainting UNet also gets its [mask, masked-image latents] conditioning channels.
  Finally the result is composited onto the original with the blurred mask, so every pixel
  where the blurred mask is 0 is exactly the original's.
- :func:`outpaint`: a bigger canvas (left/right/up/down), the new band (plus ``mask_blur`` px
  of overlap) inpainted with "fill" as masked content.
- :func:`hires_fix`: generate at the base size, upscale (latent interpolation, Lanczos, or an
  upscaler model via :mod:`malerei.engine.upscale`), then img2img at the target size.

A 9-channel UNet is run through a stand-in (:class:`InpaintingUNet`) that takes the sampler's
4-channel latents and appends the conditioning channels; ``run_job`` then sees an ordinary
4-channel model. The stand-in lives in a view of the model that shares its lock; the model's own
guard is held around the job here (the view has its own, uncontended one).

Infotext: A1111's fields plus ``Denoising strength``, ``Mask blur``, ``Inpaint area``,
``Masked area padding``, ``Masked content``, ``Resize mode``, ``Hires upscale``/``steps``/``upscaler``;
the recipe gains a section named after the job kind.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from malerei.engine import images as imgs
from malerei.engine.errors import ImageError, InvalidParameter

if TYPE_CHECKING:
    import PIL.Image
    import torch

    from malerei.engine.loading import LoadedModel
    from malerei.engine.pipeline import GeneratedImage, GenerationParams, ResolvedParams

MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
MAX_MASK_BLUR = 64
MAX_PADDING = 512
MAX_EXTEND = 2048
LATENT_UPSCALE_MODES = {  # A1111's latent upscalers: (interpolation, antialias)
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_UPSCALERS = ("Lanczos", "Nearest")


@dataclass(frozen=True, kw_only=True)
class InpaintOptions:
    strength: float = 0.75  # A1111 "Denoising strength"
    mask_blur: float = 4.0  # px, Gaussian sigma
    only_masked: bool = False  # A1111 "Inpaint area: Only masked"
    padding: int = 32  # A1111 "Only masked padding, pixels"
    masked_content: str = "original"  # fill | original | latent noise | latent nothing


@dataclass(frozen=True, kw_only=True)
class HiresOptions:
    scale: float = 2.0  # A1111 "Upscale by"
    upscaler: str = "Latent"  # a latent mode, Lanczos, Nearest, or an upscaler model name/path
    strength: float = 0.7  # denoising strength of the second pass
    steps: int | None = None  # second-pass steps; None: as the first pass


# ---------------------------------------------------------------------------------------------
# Checks


def check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength != strength:
        raise InvalidParameter(f"denoising strength must be a number, got {strength!r}")
    if not 0.0 < strength <= 1.0:
        raise InvalidParameter(f"denoising strength {strength:g} is out of range; allowed: above 0 up to 1")
    return float(strength)


def check_inpaint_options(options: InpaintOptions) -> InpaintOptions:
    check_strength(options.strength)
    blur = options.mask_blur
    if isinstance(blur, bool) or not isinstance(blur, (int, float)) or not 0 <= blur <= MAX_MASK_BLUR:
        raise InvalidParameter(f"mask blur {blur!r} is out of range; allowed: 0..{MAX_MASK_BLUR}")
    pad = options.padding
    if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad <= MAX_PADDING:
        raise InvalidParameter(f"only-masked padding {pad!r} is out of range; allowed: 0..{MAX_PADDING}")
    if options.masked_content not in MASKED_CONTENT:
        raise InvalidParameter(f"unknown masked content {options.masked_content!r}; allowed: "
                               f"{', '.join(MASKED_CONTENT)}")
    return options


def check_hires_options(options: HiresOptions) -> HiresOptions:
    scale = options.scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 1.0 < scale <= 4.0:
        raise InvalidParameter(f"hires scale {scale!r} is out of range; allowed: above 1 up to 4")
    check_strength(options.strength)
    if options.steps is not None and (isinstance(options.steps, bool) or not isinstance(options.steps, int)
                                      or not 1 <= options.steps <= 150):
        raise InvalidParameter(f"hires steps {options.steps!r} is out of range; allowed: 1..150")
    if not isinstance(options.upscaler, str) or not options.upscaler.strip():
        raise InvalidParameter("hires upscaler must be a name: "
                               f"{', '.join([*LATENT_UPSCALE_MODES, *PIXEL_UPSCALERS])} or an upscaler model")
    return options


def unet_kind(model: LoadedModel) -> str:
    """"plain" (4 latent channels in) or "inpainting" (9: latents, mask, masked-image latents)."""
    config = model.pipe.unet.config
    if config.in_channels == config.out_channels:
        return "plain"
    if config.in_channels == 2 * config.out_channels + 1:
        return "inpainting"
    raise InvalidParameter(f"{model.name}: a UNet with {config.in_channels} input channels is not supported; "
                           f"supported: {config.out_channels} (text to image) or {2 * config.out_channels + 1} "
                           "(inpainting)")


# ---------------------------------------------------------------------------------------------
# Holding the model (as pipeline.run_job does) and encoding with the VAE


def _job_mutates(model: LoadedModel, job: ResolvedParams) -> bool:
    from malerei.engine.pipeline import needs_vae_upcast
    from malerei.engine.prompts import extract_lora_tags

    return bool(extract_lora_tags(job.prompt)[1]) or needs_vae_upcast(model.pipe)


def encode_latents(model: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] [N, 3, H, W] -> latents as the sampler sees them (posterior mean)."""
    import torch

    from malerei.engine.pipeline import execution_device, hold_model, module_dtype, needs_vae_upcast, normalise_latents

    pipe = model.pipe
    vae = pipe.vae
    device = execution_device(pipe)
    upcast = needs_vae_upcast(pipe)
    with torch.inference_mode(), hold_model(model, mutates=upcast):
        if upcast:
            vae.to(dtype=torch.float32)
            try:
                raw = vae.encode(pixels.to(device, torch.float32)).latent_dist.mean
            finally:
                vae.to(dtype=torch.float16)
        else:
            raw = vae.encode(pixels.to(device, module_dtype(vae))).latent_dist.mean
        return normalise_latents(vae, raw.float()).to(module_dtype(pipe.unet))


def _sha256(image: PIL.Image.Image) -> str:
    return hashlib.sha256(imgs.to_rgb(image).tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The 9-channel UNet stand-in


class InpaintingUNet:
    """A 9-channel inpainting UNet seen as a 4-channel one: each call appends the conditioning
    channels ``[mask, masked-image latents]`` (diffusers' channel order) to the latents.

    Everything else (config, parameters, hooks, submodules) is the real UNet's, except
    ``config.in_channels``, which says 4 so that the pipeline draws 4-channel noise.
    """

    def __init__(self, unet, conditioning: torch.Tensor) -> None:
        from diffusers.configuration_utils import FrozenDict

        self._unet = unet
        self._conditioning = conditioning
        self.config = FrozenDict({**unet.config, "in_channels": unet.config.out_channels})

    def __getattr__(self, name):
        return getattr(self._unet, name)

    def __call__(self, x, t, **kwargs):
        import torch

        cond = self._conditioning.to(device=x.device, dtype=x.dtype)
        if x.shape[0] % cond.shape[0]:
            raise ValueError(f"latents batch {x.shape[0]} is not a multiple of the conditioning batch {cond.shape[0]}")
        cond = cond.repeat(x.shape[0] // cond.shape[0], 1, 1, 1)
        return self._unet(torch.cat([x, cond], dim=1), t, **kwargs)


class _PipeView:
    """The model's pipeline with another ``unet``; every other attribute is the pipeline's own."""

    def __init__(self, pipe, unet) -> None:
        self._pipe = pipe
        self.unet = unet

    def __getattr__(self, name):
        return getattr(self._pipe, name)


# ---------------------------------------------------------------------------------------------
# The shared run


def _processing_size(model: LoadedModel, params: GenerationParams, size: tuple[int, int]) -> tuple[int, int]:
    """The size to sample at: the params' width/height, else the image's, rounded to multiples of 8."""
    from malerei.engine.pipeline import vae_scale_factor

    multiple = max(8, vae_scale_factor(model.pipe))
    rounded = imgs.round_size(size[0], size[1], multiple)
    width = params.width if params.width is not None else rounded[0]
    height = params.height if params.height is not None else rounded[1]
    return width, height


def _blend_fn(init: torch.Tensor, keep: torch.Tensor, noise: torch.Tensor) -> Callable:
    """``blend(x, i, level)``: outside the mask, the init latents at the step's noise level."""
    cache: dict = {}

    def blend(x, i, level):
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = (init.to(*key), keep.to(*key), noise.to(*key))
        x0, k, eps = cache[key]
        return k * level.noised(x0, eps) + (1 - k) * x

    return blend


def _run(model: LoadedModel, job: ResolvedParams, *, init_latents: torch.Tensor, strength: float,
         keep: torch.Tensor | None = None, conditioning: torch.Tensor | None = None, kind: str,
         progress=None, cancel=None, preview_every: int = 0, models_dir: Path | None = None,
         blend: Callable | None = None) -> list[GeneratedImage]:
    from malerei.engine import noise
    from malerei.engine.pipeline import hold_model, run_job

    if init_latents.shape[0] == 1 and job.batch_size > 1:
        init_latents = init_latents.repeat(job.batch_size, 1, 1, 1)
    if keep is not None:
        streams = noise.ImageNoise.for_batch(job.seed, job.batch_size, subseed=job.subseed,
                                             subseed_strength=job.subseed_strength)
        start = streams.initial(tuple(init_latents.shape[1:]), device=init_latents.device, dtype=init_latents.dtype)
        blend = _blend_fn(init_latents, keep, start)
    kwargs = dict(progress=progress, cancel=cancel, preview_every=preview_every, models_dir=models_dir,
                  init_latents=init_latents, strength=strength, blend=blend, kind=kind)
    if conditioning is None:
        if unet_kind(model) == "inpainting":
            raise InvalidParameter(f"{model.name} is an inpainting model; it needs a mask")
        return run_job(model, job, **kwargs)
    view = dataclasses.replace(model, pipe=_PipeView(model.pipe, InpaintingUNet(model.pipe.unet, conditioning)))
    with hold_model(model, mutates=_job_mutates(model, job)):
        return run_job(view, job, **kwargs)


def _finish(model: LoadedModel, job: ResolvedParams, results: list[GeneratedImage], *, fields: dict,
            section: str, details: dict) -> list[GeneratedImage]:
    """Infotext with A1111's img2img fields and the recipe section of this job kind."""
    from malerei.engine import metadata
    from malerei.engine.pipeline import infotext_fields

    for i, result in enumerate(results):
        own = job.for_image(i)
        values = infotext_fields(model, own)
        loras = [r for r in result.recipe.get("loras") or [] if r.get("short_hash")]
        embeddings = [r for r in result.recipe.get("embeddings") or [] if r.get("short_hash")]
        if loras:
            values["Lora hashes"] = {r["name"]: r["short_hash"] for r in loras}
        if embeddings:
            values["TI hashes"] = {r["name"]: r["short_hash"] for r in embeddings}
        values.update(fields)
        result.infotext = metadata.format_infotext(prompt=own.prompt, negative_prompt=own.negative_prompt,
                                                   params=values)
        result.recipe[section] = dict(details)
    return results


# ---------------------------------------------------------------------------------------------
# img2img


def img2img(model: LoadedModel, params: GenerationParams, image: PIL.Image.Image, *, strength: float = 0.75,
            resize_mode: str = "just resize", progress=None, cancel=None, preview_every: int = 0,
            models_dir: Path | None = None) -> list[GeneratedImage]:
    """The image changed by the prompt; ``strength`` 1 keeps nothing but its colours' influence."""
    import torch

    from malerei.engine.pipeline import resolve_params

    strength = check_strength(strength)
    resize_mode = imgs.check_resize_mode(resize_mode)
    kind = unet_kind(model)
    width, height = _processing_size(model, params, image.size)
    job = resolve_params(model, dataclasses.replace(params, width=width, height=height))
    init = imgs.resize_image(imgs.to_rgb(image), job.width, job.height, resize_mode)
    init_latents = encode_latents(model, imgs.to_tensor(init))
    conditioning = None
    if kind == "inpainting":
        # A1111 with an inpainting model in img2img: mask everything, masked image all zeros.
        h, w = init_latents.shape[-2:]
        masked = encode_latents(model, torch.zeros(1, 3, job.height, job.width))
        conditioning = torch.cat([torch.ones(1, 1, h, w, dtype=masked.dtype, device=masked.device), masked], 1)
    results = _run(model, job, init_latents=init_latents, strength=strength, conditioning=conditioning,
                   kind="img2img", progress=progress, cancel=cancel, preview_every=preview_every,
                   models_dir=models_dir)
    fields = {"Denoising strength": strength}
    if resize_mode != "just resize":
        fields["Resize mode"] = resize_mode.capitalize()
    return _finish(model, job, results, fields=fields, section="img2img", details={
        "strength": strength, "resize_mode": resize_mode, "init_image_size": list(image.size),
        "init_image_sha256": _sha256(image)})


# ---------------------------------------------------------------------------------------------
# inpaint


def _hard(mask: PIL.Image.Image) -> PIL.Image.Image:
    return mask.convert("L").point(lambda v: 255 if v >= 128 else 0)


def _latent_mask(mask: PIL.Image.Image, factor: int) -> torch.Tensor:
    """Pixel mask (processing size) -> [1, 1, h, w]: 1 where any pixel of the latent cell is masked."""
    import torch.nn.functional as F

    return F.max_pool2d(imgs.mask_to_tensor(_hard(mask)), factor)


def inpaint(model: LoadedModel, params: GenerationParams, image: PIL.Image.Image,
            mask: PIL.Image.Image | None = None, *, options: InpaintOptions = InpaintOptions(), progress=None,
            cancel=None, preview_every: int = 0, models_dir: Path | None = None,
            _kind: str = "inpaint", _extra: dict | None = None) -> list[GeneratedImage]:
    """Repaint the white part of ``mask`` (default: the image's transparent pixels)."""
    from PIL import Image

    from malerei.engine.pipeline import resolve_params

    options = check_inpaint_options(options)
    if mask is None:
        mask = imgs.mask_from_alpha(image)
    mask = mask.convert("L")
    if mask.size != image.size:
        raise ImageError(f"mask is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x{image.size[1]}; "
                         "the mask must be the same size as the image")
    imgs.check_mask_not_empty(mask)
    original = imgs.to_rgb(image)
    blurred = imgs.blur_mask(mask, options.mask_blur)
    lanczos = Image.Resampling.LANCZOS

    if options.only_masked:
        job = resolve_params(model, params)
        box = imgs.crop_region(blurred, padding=options.padding, aspect=job.width / job.height)
        region = original.crop(box).resize((job.width, job.height), lanczos)
        region_mask = mask.crop(box).resize((job.width, job.height), lanczos)
    else:
        width, height = _processing_size(model, params, image.size)
        job = resolve_params(model, dataclasses.replace(params, width=width, height=height))
        box = None
        region = original.resize((job.width, job.height), lanczos) if original.size != (job.width, job.height) else original
        region_mask = mask.resize((job.width, job.height), lanczos) if mask.size != region.size else mask

    results = _inpaint_region(model, job, region, region_mask, options, kind=_kind, progress=progress,
                              cancel=cancel, preview_every=preview_every, models_dir=models_dir)
    for result in results:
        generated = result.image
        if box is not None:
            canvas = original.copy()
            canvas.paste(generated.resize((box[2] - box[0], box[3] - box[1]), lanczos), box[:2])
            generated = canvas
        result.image = imgs.composite(original, generated, blurred)

    fields = {"Denoising strength": options.strength, "Mask blur": options.mask_blur,
              "Masked content": options.masked_content}
    if options.only_masked:
        fields.update({"Inpaint area": "Only masked", "Masked area padding": options.padding})
    details = {"strength": options.strength, "mask_blur": options.mask_blur, "only_masked": options.only_masked,
               "padding": options.padding, "masked_content": options.masked_content, "crop_region": list(box) if box else None,
               "init_image_size": list(image.size), "init_image_sha256": _sha256(image),
               "mask_sha256": hashlib.sha256(mask.tobytes()).hexdigest(), "unet": unet_kind(model),
               **(_extra or {})}
    return _finish(model, job, results, fields=fields, section=_kind, details=details)


def _inpaint_region(model: LoadedModel, job: ResolvedParams, region: PIL.Image.Image, region_mask: PIL.Image.Image,
                    options: InpaintOptions, *, kind: str, **run_kwargs) -> list[GeneratedImage]:
    """Sample ``region`` (at processing size) with ``region_mask`` repainted."""
    import torch

    from malerei.engine import noise
    from malerei.engine.pipeline import vae_scale_factor

    factor = vae_scale_factor(model.pipe)
    unet = unet_kind(model)
    hard = _hard(region_mask)
    init_image = imgs.fill_masked(region, hard) if options.masked_content == "fill" else region
    pixels = imgs.to_tensor(init_image)
    init = encode_latents(model, pixels)
    masked_latent = _latent_mask(region_mask, factor).to(init.device, init.dtype)
    keep = 1 - masked_latent
    if options.masked_content in ("latent noise", "latent nothing"):
        init = init.repeat(job.batch_size, 1, 1, 1)
        fresh = torch.zeros_like(init)
        if options.masked_content == "latent noise":
            # The streams' second draw: the first is the sampler's starting noise.
            streams = noise.ImageNoise.for_batch(job.seed, job.batch_size, subseed=job.subseed,
                                                 subseed_strength=job.subseed_strength)
            streams.initial(tuple(init.shape[1:]))
            fresh = streams.randn_like(init)
        init = init * keep + fresh * masked_latent
    conditioning = None
    if unet == "inpainting":
        # diffusers' StableDiffusionInpaintPipeline: masked image = image * (mask < 0.5).
        hard_t = imgs.mask_to_tensor(hard)
        masked_image = imgs.to_tensor(region) * (hard_t < 0.5)
        conditioning = torch.cat([masked_latent, encode_latents(model, masked_image)], dim=1)
    return _run(model, job, init_latents=init, strength=options.strength, keep=keep, conditioning=conditioning,
                kind=kind, **run_kwargs)


# ---------------------------------------------------------------------------------------------
# outpaint


def outpaint(model: LoadedModel, params: GenerationParams, image: PIL.Image.Image, *, left: int = 0, right: int = 0,
             up: int = 0, down: int = 0, options: InpaintOptions = InpaintOptions(strength=0.8, masked_content="fill"),
             progress=None, cancel=None, preview_every: int = 0, models_dir: Path | None = None) -> list[GeneratedImage]:
    """The image on a canvas grown by ``left``/``right``/``up``/``down`` px, the new area painted."""
    import numpy as np
    from PIL import Image, ImageDraw

    sides = {"left": left, "right": right, "up": up, "down": down}
    for name, value in sides.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_EXTEND:
            raise InvalidParameter(f"outpaint {name} {value!r} is out of range; allowed: 0..{MAX_EXTEND} px")
    if not any(sides.values()):
        raise InvalidParameter("outpaint needs at least one of left, right, up, down above 0")
    check_inpaint_options(options)
    if options.only_masked:
        raise InvalidParameter("outpaint works on the whole canvas; only-masked does not apply")
    w, h = image.size
    source = np.asarray(imgs.to_rgb(image))
    # The new band starts as the nearest edge pixels; masked content "fill" then smooths it.
    canvas = Image.fromarray(np.pad(source, ((up, down), (left, right), (0, 0)), mode="edge"))
    overlap = int(round(options.mask_blur))
    mask = Image.new("L", canvas.size, 255)
    keep = (left + (overlap if left else 0), up + (overlap if up else 0),
            left + w - (overlap if right else 0), up + h - (overlap if down else 0))
    if keep[2] > keep[0] and keep[3] > keep[1]:
        ImageDraw.Draw(mask).rectangle((keep[0], keep[1], keep[2] - 1, keep[3] - 1), fill=0)
    return inpaint(model, params, canvas, mask, options=options, progress=progress, cancel=cancel,
                   preview_every=preview_every, models_dir=models_dir, _kind="outpaint",
                   _extra={"extend": sides, "source_size": [w, h]})


# ---------------------------------------------------------------------------------------------
# hires fix


def hires_fix(model: LoadedModel, params: GenerationParams, options: HiresOptions = HiresOptions(), *,
              upscaler=None, progress=None, cancel=None, preview_every: int = 0,
              models_dir: Path | None = None) -> list[GeneratedImage]:
    """A1111's hires fix: text to image at the base size, upscale by ``options.scale``, then img2img
    at the target size with ``options.strength``. ``upscaler``: a loaded
    :class:`malerei.engine.upscale.Upscaler` when ``options.upscaler`` names a model."""
    import torch
    from PIL import Image

    from malerei.engine.pipeline import check_size, resolve_params, run_job, vae_scale_factor

    options = check_hires_options(options)
    if unet_kind(model) != "plain":
        raise InvalidParameter(f"{model.name} is an inpainting model; the hires fix needs a text-to-image model")
    latent_mode = LATENT_UPSCALE_MODES.get(options.upscaler)
    if latent_mode is None and options.upscaler not in PIXEL_UPSCALERS and upscaler is None:
        raise InvalidParameter(f"hires upscaler {options.upscaler!r} is not loaded; allowed: "
                               f"{', '.join([*LATENT_UPSCALE_MODES, *PIXEL_UPSCALERS])} or an upscaler model")
    job1 = resolve_params(model, params)
    factor = max(8, vae_scale_factor(model.pipe))
    width2 = int(job1.width * options.scale) // factor * factor
    height2 = int(job1.height * options.scale) // factor * factor
    check_size(width2, height2, factor)
    job2 = dataclasses.replace(job1, width=width2, height=height2, steps=options.steps or job1.steps)

    # 1. First pass; the final latents are caught by a blend hook that changes nothing.
    caught: dict = {}

    def catch(x, i, level):
        caught["latents"] = x
        return x

    first = run_job(model, job1, blend=catch, kind="txt2img", progress=progress, cancel=cancel,
                    preview_every=preview_every, models_dir=models_dir)

    # 2. Upscale
    if latent_mode is not None:
        from malerei.engine.upscale import upscale_latents

        factor_px = vae_scale_factor(model.pipe)
        init = upscale_latents(caught["latents"], width2 // factor_px, height2 // factor_px, *latent_mode)
        upscaler_name = options.upscaler
    else:
        from malerei.engine.upscale import upscale_image

        upscaler_name = upscaler.name if upscaler is not None else options.upscaler
        bigger = []
        for result in first:
            if upscaler is not None:
                big = upscale_image(upscaler, result.image, options.scale).resize((width2, height2), Image.Resampling.LANCZOS)
            else:
                resample = Image.Resampling.LANCZOS if options.upscaler == "Lanczos" else Image.Resampling.NEAREST
                big = result.image.resize((width2, height2), resample=resample)
            bigger.append(big)
        init = torch.cat([encode_latents(model, imgs.to_tensor(b)) for b in bigger])

    # 3. img2img at the target size
    results = _run(model, job2, init_latents=init, strength=options.strength, kind="hires", progress=progress,
                   cancel=cancel, preview_every=preview_every, models_dir=models_dir)
    fields = {"Denoising strength": options.strength, "Hires upscale": options.scale,
              "Hires steps": options.steps, "Hires upscaler": upscaler_name}
    # The infotext describes the first pass plus the hires fields, as A1111 writes it.
    _finish(model, job1, results, fields=fields, section="hires", details={
        "scale": options.scale, "upscaler": upscaler_name, "strength": options.strength,
        "steps": job2.steps, "first_pass_size": [job1.width, job1.height], "size": [width2, height2]})
    return results
