"""img2img, inpaint and outpaint on the engine's building blocks.

The engine's ``run_job`` takes ``init_latents`` + ``strength`` (img2img: sampling starts from
the init image noised to A1111's first img2img step) and a ``blend`` hook called after every
step (inpainting: the kept region is put back at the step's noise level). This module turns a
job's images into those inputs:

- img2img: the init image resized to the job's size, encoded with the VAE.
- inpaint: as img2img, plus a latent-size mask (white = repaint, blurred by ``mask_blur`` px);
  after decoding, the kept region is pasted back from the original pixels through the blurred
  mask, so unmasked pixels are exactly the input's.
- outpaint: the init image on a larger canvas (the new border filled by stretching the edge
  pixels), inpainted where the canvas is new.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, ImageFilter, ImageOps


def _device_dtype(P: Any, pipe: Any) -> tuple[Any, Any]:
    device = P.execution_device(pipe) if hasattr(P, "execution_device") else pipe._execution_device
    dtype = P.module_dtype(pipe.unet) if hasattr(P, "module_dtype") else pipe.unet.dtype
    return device, dtype


def _init_latents(P: Any, model: Any, image: Image.Image, job: Any) -> Any:
    import torch

    device, dtype = _device_dtype(P, model.pipe)
    with torch.inference_mode():
        pixels = P.pil_to_tensor([image] * job.batch_size, width=job.width, height=job.height)
        return P.encode_latents(model.pipe, pixels.to(device, dtype))


def run_image_job(model: Any, kind: str, params: Any, images: dict[str, Image.Image], extra: dict[str, Any], *,
                  progress: Callable | None, cancel: Callable[[], bool] | None, preview_every: int,
                  models_dir: Path | None) -> list[Any]:
    """``GeneratedImage`` list for an img2img, inpaint or outpaint job."""
    from malerei.engine import pipeline as P

    job = P.resolve_params(model, params)
    init = images["init_image"].convert("RGB")
    strength = float(extra.get("denoising_strength", 0.75))
    run = dict(progress=progress, cancel=cancel, preview_every=preview_every, models_dir=models_dir)
    if kind == "img2img":
        return P.run_job(model, job, init_latents=_init_latents(P, model, init, job), strength=strength,
                         kind="img2img", **run)
    if kind == "outpaint":
        init, mask = _outpaint_canvas(init, job, extra)
        blur = 8
    else:
        mask = images["mask_image"].convert("L")
        blur = int(extra.get("mask_blur", 4))
    return _inpaint(P, model, job, init, mask, blur=blur, strength=strength, kind=kind, run=run)


def _outpaint_canvas(init: Image.Image, job: Any, extra: dict[str, Any]) -> tuple[Image.Image, Image.Image]:
    left, right, top, bottom = (int(extra.get(k, 0)) for k in ("left", "right", "top", "bottom"))
    width, height = init.width + left + right, init.height + top + bottom
    canvas = ImageOps.pad(init, (width, height), method=Image.Resampling.NEAREST, centering=(0.5, 0.5))
    canvas.paste(init.resize((width, height), Image.Resampling.BILINEAR))  # edge colours everywhere
    canvas.paste(init, (left, top))
    mask = Image.new("L", (width, height), 255)
    mask.paste(0, (left, top, left + init.width, top + init.height))
    return canvas, mask


def _inpaint(P: Any, model: Any, job: Any, init: Image.Image, mask: Image.Image, *, blur: int, strength: float,
             kind: str, run: dict[str, Any]) -> list[Any]:
    import numpy as np
    import torch

    size = (job.width, job.height)
    init = init.resize(size, Image.Resampling.LANCZOS) if init.size != size else init
    mask = mask.resize(size, Image.Resampling.NEAREST) if mask.size != size else mask
    soft = mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else mask
    init_latents = _init_latents(P, model, init, job)
    device, dtype = _device_dtype(P, model.pipe)
    factor = P.vae_scale_factor(model.pipe)
    latent_size = (job.width // factor, job.height // factor)
    small = np.asarray(soft.resize(latent_size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    repaint = torch.from_numpy(small)[None, None].to(device, init_latents.dtype)
    generator = torch.Generator("cpu").manual_seed(job.seed)
    kept_noise = torch.randn(init_latents.shape, generator=generator).to(device, init_latents.dtype)

    def blend(x: Any, step_index: int, level: Any) -> Any:
        """Outside the mask the latents follow the init image at this step's noise level."""
        return repaint * x + (1 - repaint) * level.noised(init_latents, kept_noise)

    results = P.run_job(model, job, init_latents=init_latents, strength=strength, blend=blend, kind=kind, **run)
    # pixel-exact kept region: original pixels where the (blurred) mask is black
    for result in results:
        result.image = Image.composite(result.image.convert("RGB"), init, soft)
    return results
