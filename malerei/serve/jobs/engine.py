"""The one narrow door between the service and the engine.

The worker calls :meth:`Engine.run_batch` with compatible requests and gets one
:class:`EngineResult` per request. Everything the service knows about the engine's abilities is
in this module (``KIND_SUPPORT`` maps job kinds to engine functions), so a kind switches on here
when the engine grows it. Importing this module is cheap; torch and the engine load on first use.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

log = logging.getLogger("malerei.serve.engine")


@dataclass(frozen=True, kw_only=True)
class EngineRequest:
    job_id: str
    kind: str
    model: str | None
    params: dict[str, Any]                     # resolved spec fields (no images)
    images: dict[str, Image.Image] = field(default_factory=dict)  # init_image, mask_image, image


@dataclass(kw_only=True)
class EngineImage:
    image: Image.Image
    seed: int
    infotext: str
    recipe: dict[str, Any]


@dataclass(kw_only=True)
class EngineResult:
    job_id: str
    images: list[EngineImage] = field(default_factory=list)
    error_code: str | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_code is None


ProgressFn = Callable[[int, int, Image.Image | None], None]
CancelFn = Callable[[], bool]


class Engine(Protocol):
    def run_batch(self, requests: Sequence[EngineRequest], on_progress: ProgressFn,
                  is_cancelled: CancelFn) -> list[EngineResult]:
        """Run compatible requests together. Raises ``malerei.engine.errors.Cancelled`` when
        ``is_cancelled()`` turned true (checked every step)."""


def unsupported(request: EngineRequest) -> EngineResult:
    return EngineResult(job_id=request.job_id, error_code="unsupported_kind",
                        error_message=f"{request.kind} is not supported by this engine yet; "
                                      f"supported: {', '.join(sorted(supported_kinds()))}")


# ----------------------------------------------------------------------------- the real engine
# Each job kind and the engine functions it needs ("module:function"). A kind is supported when
# all of them exist, so a kind switches on here when the engine grows it.
KIND_SUPPORT: dict[str, tuple[str, ...]] = {
    "txt2img": ("malerei.engine.pipeline:generate", "malerei.engine.batch:generate_many"),
    "img2img": ("malerei.engine.img2img:img2img",),
    "inpaint": ("malerei.engine.img2img:inpaint",),
    "outpaint": ("malerei.engine.img2img:outpaint",),
    "upscale": ("malerei.engine.upscale:load_upscaler", "malerei.engine.upscale:upscale_image"),
    "restore": ("malerei.restore.restorer:load_restorer", "malerei.restore.restorer:restore_image"),
}
# Kinds that need no diffusion model.
POSTPROCESS_KINDS = ("upscale", "restore")


def _has(target: str) -> bool:
    import importlib

    module, _, name = target.partition(":")
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def supported_kinds() -> set[str]:
    """Job kinds the installed engine can run (those whose functions all exist)."""
    return {kind for kind, needs in KIND_SUPPORT.items() if all(_has(t) for t in needs)}


class RealEngine:
    """``malerei.engine``: models loaded once (``ModelCache``), jobs run through ``generate``."""

    def __init__(self, *, catalog: Any, device: str | None = None, dtype: str | None = None,
                 preview_every: int = 2) -> None:
        self.catalog = catalog
        self.device = device
        self.dtype = dtype
        self.preview_every = preview_every
        self._cache = None
        self._tools: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def warm(self, model: str | None = None) -> None:
        """Load a model before taking jobs, so a job is never held while the engine starts."""
        try:
            self._model(model)
        except Exception:  # noqa: BLE001 - the job that needs it will fail with the reason
            log.warning("could not preload model %r", model, exc_info=True)

    def _model(self, name: str | None):  # noqa: ANN202 - LoadedModel
        from malerei.engine import loading

        with self._lock:
            if self._cache is None:
                self._cache = loading.ModelCache(max_models=1)
        return self._cache.get(self.catalog.engine_ref(name), models_dir=self.catalog.models_dir,
                               device=self.device, dtype=self.dtype)

    def run_batch(self, requests: Sequence[EngineRequest], on_progress: ProgressFn,
                  is_cancelled: CancelFn) -> list[EngineResult]:
        from malerei.engine.errors import Cancelled, MalereiError

        kinds = supported_kinds()
        results = [unsupported(r) for r in requests if r.kind not in kinds]
        for request in requests:
            if request.kind in kinds and request.kind in POSTPROCESS_KINDS:
                try:
                    results.append(self._postprocess(request, is_cancelled))
                except MalereiError as exc:
                    results.append(EngineResult(job_id=request.job_id, error_code="model_error",
                                                error_message=str(exc)))
        runnable = [r for r in requests if r.kind in kinds and r.kind not in POSTPROCESS_KINDS]
        if not runnable:
            return results
        try:
            model = self._model(runnable[0].model)
        except MalereiError as exc:
            return results + [EngineResult(job_id=r.job_id, error_code="model_error", error_message=str(exc))
                              for r in runnable]
        # Parameters each job got wrong fail that job alone; the rest run together.
        from malerei.engine.pipeline import resolve_params

        good = []
        for request in runnable:
            try:
                resolve_params(model, generation_params(request.params))
                good.append(request)
            except MalereiError as exc:
                results.append(EngineResult(job_id=request.job_id, error_code="invalid_parameter",
                                            error_message=str(exc)))
        txt = [r for r in good if r.kind == "txt2img"]
        groups = ([txt] if txt else []) + [[r] for r in good if r.kind != "txt2img"]
        for group in groups:
            try:
                if group[0].kind == "txt2img":
                    results.extend(self._txt2img(model, group, on_progress, is_cancelled))
                else:
                    results.append(self._image_job(model, group[0], on_progress, is_cancelled))
            except Cancelled:
                raise
            except MalereiError as exc:
                results.extend(EngineResult(job_id=r.job_id, error_code="invalid_parameter", error_message=str(exc))
                               for r in group)
        return results

    def _image_job(self, model: Any, request: EngineRequest, on_progress: ProgressFn,
                   is_cancelled: CancelFn) -> EngineResult:
        """img2img, inpaint, outpaint through ``malerei.engine.img2img``."""
        from malerei.engine import img2img as edit

        def progress(step: int, total: int, latents: Any = None) -> None:
            on_progress(step, total, preview_image(model, latents))

        p = request.params
        run = dict(progress=progress, cancel=is_cancelled, preview_every=self.preview_every,
                   models_dir=self.catalog.models_dir)
        params = generation_params(p)
        image = request.images["init_image"]
        strength = p.get("denoising_strength", 0.75)
        if request.kind == "img2img":
            images = edit.img2img(model, params, image, strength=strength, **run)
        elif request.kind == "inpaint":
            options = edit.InpaintOptions(strength=strength, mask_blur=float(p.get("mask_blur", 4)))
            images = edit.inpaint(model, params, image, request.images["mask_image"], options=options, **run)
        else:
            import dataclasses

            options = edit.InpaintOptions(strength=strength, masked_content="fill")
            images = edit.outpaint(model, dataclasses.replace(params, width=None, height=None), image,
                                   left=p.get("left", 0), right=p.get("right", 0), up=p.get("top", 0),
                                   down=p.get("bottom", 0), options=options, **run)
        return EngineResult(job_id=request.job_id, images=[
            EngineImage(image=g.image, seed=g.seed, infotext=g.infotext, recipe=g.recipe) for g in images])

    def _tool(self, kind: str, name: str) -> Any:
        """A loaded upscaler/restorer, kept for later jobs."""
        key = (kind, name)
        with self._lock:
            if key not in self._tools:
                path = self.catalog.tools(kind)[name]
                if kind == "upscaler":
                    from malerei.engine.upscale import load_upscaler as load
                else:
                    from malerei.restore.restorer import load_restorer as load
                self._tools[key] = load(path, device=self.device)
            return self._tools[key]

    def _postprocess(self, request: EngineRequest, is_cancelled: CancelFn) -> EngineResult:
        """upscale (super-resolution model) and restore (restoration model) of one image."""
        from malerei.engine.errors import Cancelled

        if is_cancelled():
            raise Cancelled("cancelled")
        p = request.params
        source = request.images["image"]
        if request.kind == "upscale":
            from malerei.engine.upscale import upscale_image

            tool = self._tool("upscaler", p["upscaler"])
            image = upscale_image(tool, source, p.get("scale", 2))
            fields = {"Postprocess upscale by": p.get("scale", 2), "Postprocess upscaler": tool.name}
        else:
            from malerei.restore.restorer import restore_image

            tool = self._tool("restorer", p["restorer"])
            image = restore_image(tool, source, strength=p.get("strength", 1.0))
            fields = {"Postprocess restorer": tool.name, "Restore strength": p.get("strength", 1.0)}
        infotext = ", ".join(f"{k}: {v}" for k, v in fields.items())
        recipe = {"kind": request.kind, "model": {"name": tool.name, "hash": tool.short_hash,
                                                  "architecture": tool.architecture},
                  "input_size": list(source.size), "output_size": list(image.size),
                  **{k: v for k, v in p.items() if k in ("scale", "strength")}}
        return EngineResult(job_id=request.job_id, images=[EngineImage(image=image, seed=0, infotext=infotext,
                                                                      recipe=recipe)])

    def _txt2img(self, model: Any, requests: Sequence[EngineRequest], on_progress: ProgressFn,
                 is_cancelled: CancelFn) -> list[EngineResult]:
        from malerei.engine.batch import generate_many

        def progress(step: int, total: int, latents: Any = None) -> None:
            on_progress(step, total, preview_image(model, latents))

        batches = generate_many(model, [generation_params(r.params) for r in requests], progress=progress,
                                cancel=is_cancelled, preview_every=self.preview_every,
                                models_dir=self.catalog.models_dir)
        return [EngineResult(job_id=r.job_id, images=[
            EngineImage(image=g.image, seed=g.seed, infotext=g.infotext, recipe=g.recipe) for g in images])
            for r, images in zip(requests, batches)]


def preview_image(model: Any, latents: Any) -> Image.Image | None:
    """The first image's low-resolution preview from the engine's latents (or ready images)."""
    if latents is None:
        return None
    if isinstance(latents, list):
        return latents[0] if latents else None
    try:
        from malerei.engine.pipeline import preview_images

        return preview_images(model.pipe, latents[:1])[0]
    except Exception:  # noqa: BLE001 - a preview must never break a job
        log.debug("preview failed", exc_info=True)
        return None


def generation_params(p: dict[str, Any]) -> Any:
    """A job's resolved parameters as the engine's ``GenerationParams``."""
    from malerei.engine.pipeline import GenerationParams

    return GenerationParams(
        prompt=p["prompt"], negative_prompt=p.get("negative_prompt", ""), sampler=p.get("sampler"),
        scheduler=p.get("scheduler", "Automatic"), steps=p.get("steps"), cfg_scale=p.get("cfg_scale"),
        seed=p.get("seed", -1), subseed=p.get("subseed", -1), subseed_strength=p.get("subseed_strength", 0.0),
        width=p.get("width"), height=p.get("height"), batch_size=p.get("batch_size", 1),
    )
