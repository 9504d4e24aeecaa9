"""AUTOMATIC1111 web UI API (``/sdapi/v1/``): txt2img, img2img, progress, interrupt, samplers,
schedulers, sd-models, options, png-info. Field names and answers follow A1111's ``modules/api``.
The "current model" (``sd_model_checkpoint`` in options) is kept per user."""

from __future__ import annotations

import io
import json
import time
from typing import Any

from fastapi import APIRouter
from PIL import Image as PILImage
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from malerei.serve.api.compat import b64, make_spec, resolve_model_name, round8, submit_and_wait
from malerei.serve.api.deps import CurrentUser, Identity, ServicesDep
from malerei.serve.context import Services
from malerei.serve.db.models import Job, User
from malerei.serve.errors import ApiError
from malerei.serve.jobs import service
from malerei.serve.jobs.spec import Img2Img, Inpaint, Txt2Img
from malerei.serve.uploads import decode_b64, decode_image

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])


class A1111Error(BaseModel):
    error: str
    detail: str
    body: str
    errors: str


ERRORS = {code: {"model": A1111Error, "description": "error"} for code in (400, 401, 402, 404, 413, 415, 422, 429)}


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str = Field("", max_length=8000)
    negative_prompt: str = Field("", max_length=8000)
    seed: int = Field(-1, ge=-1, le=2**32 - 1)
    subseed: int = Field(-1, ge=-1, le=2**32 - 1)
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0)
    sampler_name: str | None = Field(None, max_length=64)
    sampler_index: str | None = Field(None, max_length=64)
    scheduler: str | None = Field(None, max_length=64)
    batch_size: int = Field(1, ge=1, le=64)
    n_iter: int = Field(1, ge=1, le=64)
    steps: int | None = Field(None, ge=1, le=1000)
    cfg_scale: float | None = Field(None, ge=0.0, le=50.0)
    width: int | None = Field(None, ge=8, le=8192)
    height: int | None = Field(None, ge=8, le=8192)
    override_settings: dict[str, Any] | None = None
    send_images: bool = True


class Txt2ImgRequest(_Common):
    pass


class Img2ImgRequest(_Common):
    init_images: list[str] = Field(..., min_length=1, max_length=1)
    mask: str | None = None
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    mask_blur: int = Field(4, ge=0, le=64)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)


class ImagesAnswer(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


def _user_options(services: Services, identity: Identity) -> dict[str, Any]:
    with services.db.read() as session:
        return dict(session.get(User, identity.user.id).options or {})


def _model_for(services: Services, identity: Identity, body: _Common) -> str | None:
    wanted = (body.override_settings or {}).get("sd_model_checkpoint") or \
        _user_options(services, identity).get("sd_model_checkpoint")
    if not wanted:
        return None
    found = resolve_model_name(services, str(wanted))
    if found is None:
        raise ApiError(404, "model_not_found", f"no model named {wanted!r}")
    return found


def _spec_fields(services: Services, identity: Identity, body: _Common) -> dict[str, Any]:
    total = body.batch_size * body.n_iter
    return dict(prompt=body.prompt, negative_prompt=body.negative_prompt, seed=body.seed, subseed=body.subseed,
                subseed_strength=body.subseed_strength, sampler=body.sampler_name or body.sampler_index,
                scheduler=body.scheduler if body.scheduler not in (None, "", "automatic") else "Automatic",
                steps=body.steps, cfg_scale=body.cfg_scale, width=round8(body.width), height=round8(body.height),
                batch_size=total, model=_model_for(services, identity, body))


def _answer(finished: Any, body: _Common) -> dict[str, Any]:
    job = finished.job
    p = job.params
    infotexts = [row.infotext for row, _ in finished.images]
    seeds = [row.seed for row, _ in finished.images]
    info = {"prompt": p.get("prompt", ""), "all_prompts": [p.get("prompt", "")] * len(seeds),
            "negative_prompt": p.get("negative_prompt", ""),
            "all_negative_prompts": [p.get("negative_prompt", "")] * len(seeds),
            "seed": seeds[0] if seeds else p.get("seed"), "all_seeds": seeds,
            "subseed": p.get("subseed"), "all_subseeds": [p.get("subseed")] * len(seeds),
            "subseed_strength": p.get("subseed_strength"), "width": p.get("width"), "height": p.get("height"),
            "sampler_name": p.get("sampler"), "cfg_scale": p.get("cfg_scale"), "steps": p.get("steps"),
            "batch_size": p.get("batch_size"), "sd_model_name": job.model, "infotexts": infotexts,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created_at)),
            "malerei_job_id": job.id}
    images = [b64(png) for _, png in finished.images] if body.send_images else []
    return {"images": images, "parameters": body.model_dump(mode="json", exclude={"init_images", "mask"}),
            "info": json.dumps(info)}


@router.post("/txt2img", response_model=ImagesAnswer, responses=ERRORS)
async def txt2img(services: ServicesDep, identity: CurrentUser, body: Txt2ImgRequest) -> dict[str, Any]:
    spec = make_spec(Txt2Img, **_spec_fields(services, identity, body))
    return _answer(await submit_and_wait(services, identity, spec), body)


@router.post("/img2img", response_model=ImagesAnswer, responses=ERRORS)
async def img2img(services: ServicesDep, identity: CurrentUser, body: Img2ImgRequest) -> dict[str, Any]:
    fields = _spec_fields(services, identity, body)
    fields.update(init_image=body.init_images[0], denoising_strength=body.denoising_strength)
    if body.mask:
        mask = body.mask
        if body.inpainting_mask_invert:
            mask = _invert(services, mask)
        spec = make_spec(Inpaint, kind="inpaint", mask_image=mask, mask_blur=body.mask_blur, **fields)
    else:
        spec = make_spec(Img2Img, kind="img2img", **fields)
    return _answer(await submit_and_wait(services, identity, spec), body)


def _invert(services: Services, mask_b64: str) -> str:
    s = services.settings
    image = decode_image(decode_b64(mask_b64, max_bytes=s.max_upload_bytes), max_bytes=s.max_upload_bytes,
                         max_pixels=s.max_input_pixels, what="mask")
    out = io.BytesIO()
    PILImage.eval(image.convert("L"), lambda v: 255 - v).save(out, format="PNG")
    return b64(out.getvalue())


class ProgressState(BaseModel):
    skipped: bool
    interrupted: bool
    job: str
    job_count: int
    job_timestamp: str
    job_no: int
    sampling_step: int
    sampling_steps: int


class ProgressAnswer(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None
    textinfo: str | None


@router.get("/progress", response_model=ProgressAnswer, responses=ERRORS)
def progress(services: ServicesDep, identity: CurrentUser, skip_current_image: bool = False) -> dict[str, Any]:
    """The caller's current job (the oldest running one, else the oldest queued)."""
    with services.db.read() as session:
        jobs = session.scalars(select(Job).where(Job.user_id == identity.user.id, Job.status.in_(("queued", "running")))
                               .order_by(Job.created_at)).all()
    current = next((j for j in jobs if j.status == "running"), jobs[0] if jobs else None)
    state = {"skipped": False, "interrupted": False, "job": "", "job_count": len(jobs), "job_timestamp": "",
             "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if current is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    done = current.progress_step / current.progress_total if current.progress_total else 0.0
    elapsed = time.time() - (current.started_at or time.time())
    eta = elapsed / done - elapsed if done > 0 else 0.0
    state.update(job=current.id, interrupted=current.cancel_requested, sampling_step=current.progress_step,
                 sampling_steps=current.progress_total,
                 job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(current.created_at)))
    image = b64(current.preview_png) if current.preview_png and not skip_current_image else None
    return {"progress": round(done, 4), "eta_relative": round(eta, 3), "state": state, "current_image": image,
            "textinfo": None}


@router.post("/interrupt", responses=ERRORS)
def interrupt(services: ServicesDep, identity: CurrentUser) -> dict[str, Any]:
    """Stop the caller's running jobs (queued ones stay queued, as in A1111)."""
    with services.db.read() as session:
        ids = session.scalars(select(Job.id).where(Job.user_id == identity.user.id, Job.status == "running")).all()
    for job_id in ids:
        service.cancel(services, job_id)
    return {}


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


@router.get("/samplers", response_model=list[SamplerItem], responses=ERRORS)
def samplers(services: ServicesDep, _: CurrentUser) -> list[dict[str, Any]]:
    return [{"name": name, "aliases": [], "options": {}} for name in services.catalog.samplers()]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


@router.get("/schedulers", response_model=list[SchedulerItem], responses=ERRORS)
def schedulers(services: ServicesDep, _: CurrentUser) -> list[dict[str, Any]]:
    return [{"name": name.lower(), "label": name} for name in services.catalog.schedulers()]


class SdModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


def _title(info: Any) -> str:
    return f"{info.name} [{info.short_hash}]" if info.short_hash else info.name


@router.get("/sd-models", response_model=list[SdModelItem], responses=ERRORS)
def sd_models(services: ServicesDep, _: CurrentUser) -> list[dict[str, Any]]:
    return [{"title": _title(m), "model_name": m.name, "hash": m.short_hash, "sha256": None,
             "filename": m.name, "config": None} for m in services.catalog.models()]


OPTION_KEYS = ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "samples_format", "sd_vae")


@router.get("/options", responses=ERRORS)
def get_options(services: ServicesDep, identity: CurrentUser) -> dict[str, Any]:
    options = _user_options(services, identity)
    chosen = resolve_model_name(services, options.get("sd_model_checkpoint"))
    try:
        info = services.catalog.resolve(chosen)
    except ApiError:  # no model installed at all
        info = None
    return {"sd_model_checkpoint": _title(info) if info else None,
            "sd_checkpoint_hash": info.short_hash if info else None,
            "CLIP_stop_at_last_layers": options.get("CLIP_stop_at_last_layers", 1),
            "samples_format": "png", "sd_vae": "Automatic"}


@router.post("/options", responses=ERRORS)
def set_options(services: ServicesDep, identity: CurrentUser, body: dict[str, Any]) -> dict[str, Any]:
    """Set options for the caller; ``sd_model_checkpoint`` picks the model of later jobs."""
    updates = {k: v for k, v in body.items() if k in OPTION_KEYS}
    if "sd_model_checkpoint" in updates:
        found = resolve_model_name(services, str(updates["sd_model_checkpoint"]))
        if found is None:
            raise ApiError(404, "model_not_found", f"no model named {updates['sd_model_checkpoint']!r}")
        updates["sd_model_checkpoint"] = found
    with services.db.write() as session:
        user = session.get(User, identity.user.id)
        user.options = {**(user.options or {}), **updates}
    return {}


class PngInfoRequest(BaseModel):
    image: str = Field(..., min_length=1)


class PngInfoAnswer(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111 infotext -> fields ("Prompt", "Negative prompt", "Steps", ...), using the engine's
    parser when present."""
    try:
        from malerei.engine import metadata

        parsed = metadata.parse_infotext(text)
        if isinstance(parsed, dict):
            return parsed
    except (ImportError, AttributeError, ValueError):
        pass
    lines = text.strip().split("\n")
    fields: dict[str, Any] = {}
    settings_line = lines[-1] if len(lines) > 1 and ": " in lines[-1] else ""
    body = lines[:-1] if settings_line else lines
    negative = [line for line in body if line.startswith("Negative prompt:")]
    fields["Prompt"] = "\n".join(line for line in body if not line.startswith("Negative prompt:"))
    fields["Negative prompt"] = negative[0][len("Negative prompt:"):].strip() if negative else ""
    for part in settings_line.split(", "):
        key, sep, value = part.partition(": ")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


@router.post("/png-info", response_model=PngInfoAnswer, responses=ERRORS)
def png_info(services: ServicesDep, _: CurrentUser, body: PngInfoRequest) -> dict[str, Any]:
    s = services.settings
    data = decode_b64(body.image, max_bytes=s.max_upload_bytes)
    decode_image(data, max_bytes=s.max_upload_bytes, max_pixels=s.max_input_pixels)  # refuses bombs, junk
    with PILImage.open(io.BytesIO(data)) as image:
        text = {k: v for k, v in image.info.items() if isinstance(v, str)}
    info = text.pop("parameters", "")
    return {"info": info, "items": text, "parameters": parse_infotext(info) if info else {}}
