"""Stability AI REST v1: ``/v1/engines/list``, ``/v1/generation/{engine_id}/text-to-image``,
``image-to-image`` and ``image-to-image/masking``; ``/v1/user/account`` and ``/v1/user/balance``.

Engines are this server's models. Answers are ``{"artifacts": [{"base64", "seed",
"finishReason"}]}``, or the first image as PNG when the client sends ``Accept: image/png``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from malerei.serve.api.compat import b64, make_spec, read_upload, resolve_model_name, submit_and_wait
from malerei.serve.api.deps import CurrentUser, ServicesDep
from malerei.serve.context import Services
from malerei.serve.errors import ApiError
from malerei.serve.jobs.spec import Img2Img, Inpaint, Txt2Img

router = APIRouter(tags=["stability"])

SAMPLERS = {"DDIM": "DDIM", "DDPM": "DDPM", "K_DPMPP_2M": "DPM++ 2M", "K_DPMPP_2S_ANCESTRAL": "DPM++ 2S a",
            "K_DPM_2": "DPM2", "K_DPM_2_ANCESTRAL": "DPM2 a", "K_EULER": "Euler", "K_EULER_ANCESTRAL": "Euler a",
            "K_HEUN": "Heun", "K_LMS": "LMS", "K_DPMPP_SDE": "DPM++ SDE"}


class StabilityError(BaseModel):
    id: str
    name: str
    message: str


ERRORS = {code: {"model": StabilityError, "description": "error"} for code in (400, 401, 402, 404, 413, 415, 422, 429)}
ENGINE_ID = Annotated[str, Path(max_length=255)]


class Engine(BaseModel):
    id: str
    name: str
    description: str
    type: str


@router.get("/v1/engines/list", response_model=list[Engine], responses=ERRORS)
def engines(services: ServicesDep, _: CurrentUser) -> list[dict[str, Any]]:
    return [{"id": m.name, "name": m.title, "description": f"malerei model {m.name}", "type": "PICTURE"}
            for m in services.catalog.models()]


class TextPrompt(BaseModel):
    text: str = Field(..., max_length=2000)
    weight: float = 1.0


class TextToImage(BaseModel):
    model_config = ConfigDict(extra="allow")

    text_prompts: list[TextPrompt] = Field(..., min_length=1, max_length=10)
    height: int | None = Field(None, ge=8, le=8192)
    width: int | None = Field(None, ge=8, le=8192)
    cfg_scale: float | None = Field(None, ge=0, le=35)
    clip_guidance_preset: str | None = None
    sampler: str | None = None
    samples: int = Field(1, ge=1, le=10)
    seed: int = Field(0, ge=0, le=4294967295)
    steps: int | None = Field(None, ge=1, le=150)
    style_preset: str | None = None


class Artifact(BaseModel):
    base64: str
    seed: int
    finishReason: Literal["SUCCESS", "ERROR", "CONTENT_FILTERED"]


class ArtifactsAnswer(BaseModel):
    artifacts: list[Artifact]


ANSWERS = {200: {"model": ArtifactsAnswer, "content": {"image/png": {}},
                 "description": "artifacts, or with Accept: image/png the first image"}, **ERRORS}


def _engine(services: Services, engine_id: str) -> str:
    found = resolve_model_name(services, engine_id)
    if found is None:
        raise ApiError(404, "not_found", f"engine {engine_id!r} not found; see /v1/engines/list")
    return found


def _prompts(prompts: list[TextPrompt]) -> tuple[str, str]:
    """Weighted prompts -> A1111 prompt syntax; negative weights form the negative prompt."""
    def term(p: TextPrompt) -> str:
        weight = abs(p.weight)
        return p.text if weight == 1 else f"({p.text}:{weight:g})"

    positive = ", ".join(term(p) for p in prompts if p.weight >= 0 and p.text)
    negative = ", ".join(term(p) for p in prompts if p.weight < 0 and p.text)
    return positive, negative


def _sampler(name: str | None) -> str | None:
    if name is None:
        return None
    if name not in SAMPLERS:
        raise ApiError(400, "invalid_sampler", f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name]


def _round8(value: int | None) -> int | None:
    return None if value is None else max(8, value // 8 * 8)


async def _answer(request: Request, services: Services, identity: Any, spec: Any) -> Any:
    finished = await submit_and_wait(services, identity, spec)
    if "image/png" in request.headers.get("accept", "") and finished.images:
        row, png = finished.images[0]
        return Response(png, media_type="image/png", headers={"Finish-Reason": "SUCCESS", "Seed": str(row.seed)})
    return {"artifacts": [{"base64": b64(png), "seed": row.seed, "finishReason": "SUCCESS"}
                          for row, png in finished.images]}


@router.post("/v1/generation/{engine_id}/text-to-image", response_model=ArtifactsAnswer, responses=ANSWERS)
async def text_to_image(request: Request, services: ServicesDep, identity: CurrentUser, engine_id: ENGINE_ID,
                        body: TextToImage) -> Any:
    prompt, negative = _prompts(body.text_prompts)
    spec = make_spec(Txt2Img, model=_engine(services, engine_id), prompt=prompt, negative_prompt=negative,
                     width=_round8(body.width), height=_round8(body.height), cfg_scale=body.cfg_scale,
                     sampler=_sampler(body.sampler), batch_size=body.samples,
                     seed=body.seed if body.seed > 0 else -1, steps=body.steps)
    return await _answer(request, services, identity, spec)


_PROMPT_FIELD = re.compile(r"^text_prompts\[(\d+)\]\[(text|weight)\]$")


async def _form(request: Request, services: Services) -> tuple[dict[str, Any], dict[str, str | None]]:
    """Stability's multipart fields; ``text_prompts[i][text|weight]`` become a list."""
    form = await request.form(max_files=4, max_fields=100)
    fields: dict[str, Any] = {}
    files: dict[str, str | None] = {}
    prompts: dict[int, dict[str, Any]] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            files[key] = await read_upload(value, services, key)
            continue
        match = _PROMPT_FIELD.match(key)
        if match:
            prompts.setdefault(int(match.group(1)), {})[match.group(2)] = value
        else:
            fields[key] = value
    try:
        fields["text_prompts"] = [TextPrompt(text=p.get("text", ""), weight=float(p.get("weight", 1.0)))
                                  for _, p in sorted(prompts.items())]
        for name in ("cfg_scale", "image_strength", "step_schedule_start"):
            if name in fields:
                fields[name] = float(fields[name])
        for name in ("samples", "seed", "steps"):
            if name in fields:
                fields[name] = int(fields[name])
    except ValueError as exc:
        raise ApiError(400, "invalid_parameter", f"a form field has the wrong type: {exc}") from None
    if not fields["text_prompts"]:
        raise ApiError(400, "invalid_parameter", "text_prompts[0][text] is required")
    for name in files:
        if name not in ("init_image", "mask_image"):
            raise ApiError(400, "invalid_parameter", f"unexpected file field {name!r}")
    if not files.get("init_image"):
        raise ApiError(400, "invalid_parameter", "init_image (a PNG, JPEG or WebP file) is required")
    return fields, files


def _image_spec_fields(services: Services, engine_id: str, fields: dict[str, Any]) -> dict[str, Any]:
    prompt, negative = _prompts(fields["text_prompts"])
    if fields.get("init_image_mode", "IMAGE_STRENGTH") == "STEP_SCHEDULE":
        strength = fields.get("step_schedule_start", 0.65)
    else:
        strength = 1.0 - fields.get("image_strength", 0.35)
    seed = fields.get("seed", 0)
    return dict(model=_engine(services, engine_id), prompt=prompt, negative_prompt=negative,
                cfg_scale=fields.get("cfg_scale"), sampler=_sampler(fields.get("sampler")),
                batch_size=fields.get("samples", 1), seed=seed if seed > 0 else -1, steps=fields.get("steps"),
                denoising_strength=strength)


MULTIPART = {"requestBody": {"content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["init_image", "text_prompts[0][text]"],
    "properties": {"init_image": {"type": "string", "format": "binary"},
                   "mask_image": {"type": "string", "format": "binary"},
                   "mask_source": {"type": "string", "enum": ["MASK_IMAGE_WHITE", "MASK_IMAGE_BLACK", "INIT_IMAGE_ALPHA"]},
                   "text_prompts[0][text]": {"type": "string"}, "text_prompts[0][weight]": {"type": "number"},
                   "init_image_mode": {"type": "string", "enum": ["IMAGE_STRENGTH", "STEP_SCHEDULE"]},
                   "image_strength": {"type": "number"}, "cfg_scale": {"type": "number"},
                   "samples": {"type": "integer"}, "seed": {"type": "integer"}, "steps": {"type": "integer"},
                   "sampler": {"type": "string"}}}}}}}


@router.post("/v1/generation/{engine_id}/image-to-image", response_model=ArtifactsAnswer, responses=ANSWERS,
             openapi_extra=MULTIPART)
async def image_to_image(request: Request, services: ServicesDep, identity: CurrentUser,
                         engine_id: ENGINE_ID) -> Any:
    fields, files = await _form(request, services)
    spec = make_spec(Img2Img, kind="img2img", init_image=files["init_image"],
                     **_image_spec_fields(services, engine_id, fields))
    return await _answer(request, services, identity, spec)


@router.post("/v1/generation/{engine_id}/image-to-image/masking", response_model=ArtifactsAnswer,
             responses=ANSWERS, openapi_extra=MULTIPART)
async def masking(request: Request, services: ServicesDep, identity: CurrentUser, engine_id: ENGINE_ID) -> Any:
    import io

    from PIL import Image as PILImage, ImageOps

    from malerei.serve.uploads import decode_b64, decode_image

    fields, files = await _form(request, services)
    source = fields.get("mask_source", "MASK_IMAGE_WHITE")
    s = services.settings

    def load(value: str, what: str) -> PILImage.Image:
        return decode_image(decode_b64(value, max_bytes=s.max_upload_bytes), max_bytes=s.max_upload_bytes,
                            max_pixels=s.max_input_pixels, what=what)

    if source == "INIT_IMAGE_ALPHA":
        init = load(files["init_image"], "init_image")
        if init.mode != "RGBA":
            raise ApiError(400, "invalid_parameter", "mask_source INIT_IMAGE_ALPHA needs an init_image with alpha")
        mask = ImageOps.invert(init.getchannel("A"))
    elif source in ("MASK_IMAGE_WHITE", "MASK_IMAGE_BLACK"):
        if not files.get("mask_image"):
            raise ApiError(400, "invalid_parameter", f"mask_source {source} needs mask_image")
        mask = load(files["mask_image"], "mask_image").convert("L")
        if source == "MASK_IMAGE_BLACK":
            mask = ImageOps.invert(mask)
    else:
        raise ApiError(400, "invalid_parameter",
                       "mask_source must be MASK_IMAGE_WHITE, MASK_IMAGE_BLACK or INIT_IMAGE_ALPHA")
    out = io.BytesIO()
    mask.save(out, format="PNG")
    spec = make_spec(Inpaint, kind="inpaint", init_image=files["init_image"], mask_image=b64(out.getvalue()),
                     **_image_spec_fields(services, engine_id, fields))
    return await _answer(request, services, identity, spec)


class Account(BaseModel):
    id: str
    email: str
    profile_picture: str
    organizations: list[dict[str, Any]]


class Balance(BaseModel):
    credits: float


@router.get("/v1/user/account", response_model=Account, responses=ERRORS)
def account(identity: CurrentUser) -> dict[str, Any]:
    return {"id": identity.user.name, "email": "", "profile_picture": "", "organizations": []}


@router.get("/v1/user/balance", response_model=Balance, responses=ERRORS)
def balance(services: ServicesDep, identity: CurrentUser) -> dict[str, Any]:
    from malerei.serve import credits

    with services.db.read() as session:
        return {"credits": float(credits.balance(session, identity.user.id))}
