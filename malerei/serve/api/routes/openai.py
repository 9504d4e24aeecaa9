"""OpenAI Images API: ``POST /v1/images/generations`` and ``/v1/images/edits``.

``model`` may name one of this server's models; OpenAI's names (dall-e-2, dall-e-3, gpt-image-1)
mean the default model. ``response_format`` ``url`` answers signed, expiring URLs that work
without credentials; ``b64_json`` answers the PNGs inline.
"""

from __future__ import annotations

import io
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from malerei.serve.api.compat import (b64, make_spec, parse_size, read_upload, resolve_model_name, round8,
                                      submit_and_wait)
from malerei.serve.api.deps import CurrentUser, ServicesDep
from malerei.serve.api.routes.gallery import signed_url
from malerei.serve.errors import ApiError
from malerei.serve.jobs.spec import Img2Img, Inpaint, Txt2Img
from malerei.serve.uploads import decode_b64, decode_image

router = APIRouter(tags=["openai"])

OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini")


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    error: OpenAIError


ERRORS = {code: {"model": OpenAIErrorBody, "description": "error"} for code in (400, 401, 402, 413, 415, 422, 429)}


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str = Field(..., max_length=32000)
    model: str | None = None
    n: int = Field(1, ge=1, le=10)
    size: str | None = Field(None, max_length=20, description="'WxH' or 'auto'")
    response_format: Literal["url", "b64_json"] = "url"
    quality: str | None = None
    style: str | None = None
    user: str | None = None


class ImageDatum(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageDatum]


def _model(services: Any, name: str | None) -> str | None:
    if name is None or name in OPENAI_MODELS:
        return None
    found = resolve_model_name(services, name)
    if found is None:
        raise ApiError(404, "model_not_found", f"the model {name!r} does not exist; "
                                               f"available: {', '.join(m.name for m in services.catalog.models())}")
    return found


def _answer(request: Request, services: Any, finished: Any, response_format: str, prompt: str) -> dict[str, Any]:
    data = []
    for row, png in finished.images:
        if response_format == "b64_json":
            data.append({"b64_json": b64(png), "revised_prompt": prompt})
        else:
            data.append({"url": str(request.base_url).rstrip("/") + signed_url(services, row.id),
                         "revised_prompt": prompt})
    return {"created": int(time.time()), "data": data}


@router.post("/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
             responses=ERRORS)
async def generations(request: Request, services: ServicesDep, identity: CurrentUser,
                      body: GenerationRequest) -> dict[str, Any]:
    width, height = parse_size(body.size)
    spec = make_spec(Txt2Img, prompt=body.prompt, model=_model(services, body.model), batch_size=body.n,
                     width=round8(width), height=round8(height))
    finished = await submit_and_wait(services, identity, spec)
    return _answer(request, services, finished, body.response_format, body.prompt)


def _alpha_mask(b64_image: str, services: Any) -> str | None:
    """OpenAI: fully transparent pixels mark where to edit. Returns a white-on-black mask or None."""
    s = services.settings
    image = decode_image(decode_b64(b64_image, max_bytes=s.max_upload_bytes), max_bytes=s.max_upload_bytes,
                         max_pixels=s.max_input_pixels)
    if image.mode != "RGBA":
        return None
    alpha = image.getchannel("A")
    if alpha.getextrema()[0] > 0:
        return None
    mask = alpha.point(lambda a: 255 if a == 0 else 0).convert("L")
    out = io.BytesIO()
    mask.save(out, format="PNG")
    return b64(out.getvalue())


@router.post("/v1/images/edits", response_model=ImagesResponse, response_model_exclude_none=True, responses=ERRORS)
async def edits(request: Request, services: ServicesDep, identity: CurrentUser,
                image: Annotated[UploadFile, File(description="PNG, JPEG or WebP to edit")],
                prompt: Annotated[str, Form(max_length=32000)],
                mask: Annotated[UploadFile | None, File(description="transparent where to edit")] = None,
                model: Annotated[str | None, Form()] = None,
                n: Annotated[int, Form(ge=1, le=10)] = 1,
                size: Annotated[str | None, Form(max_length=20)] = None,
                response_format: Annotated[Literal["url", "b64_json"], Form()] = "url") -> dict[str, Any]:
    width, height = parse_size(size)
    init = await read_upload(image, services, "image")
    mask_b64 = await read_upload(mask, services, "mask")
    if mask_b64 is not None:
        mask_b64 = _alpha_mask(mask_b64, services) or mask_b64
    else:
        mask_b64 = _alpha_mask(init, services)
    common = dict(prompt=prompt, model=_model(services, model), batch_size=n, width=round8(width),
                  height=round8(height), init_image=init)
    if mask_b64 is not None:
        spec = make_spec(Inpaint, kind="inpaint", mask_image=mask_b64, **common)
    else:
        spec = make_spec(Img2Img, kind="img2img", **common)
    finished = await submit_and_wait(services, identity, spec)
    return _answer(request, services, finished, response_format, prompt)

