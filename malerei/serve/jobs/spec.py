"""What a job asks for: one pydantic model per kind, discriminated by ``kind``.

These are the native API's request bodies; the compatible APIs translate their requests into
them, so validation and defaults live here once. Bounds that depend on the server's settings
(max pixels, steps, batch) are checked again in ``jobs.service`` with a message naming the limit.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

KINDS = ("txt2img", "img2img", "inpaint", "outpaint", "upscale", "restore")
# Kinds whose result is made by the denoising pipeline (and so cost by steps).
DIFFUSION_KINDS = ("txt2img", "img2img", "inpaint", "outpaint")

Base64Image = Annotated[str, Field(min_length=1, description="PNG, JPEG or WebP, base64 (a data: URL prefix is allowed)")]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=255, description="model name; default: the server's default model")
    webhook_url: str | None = Field(None, max_length=2000,
                                    description="receives an HMAC-signed POST when the job finishes")

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("webhook_url must be an http:// or https:// URL")
        return value


class _Diffusion(_Spec):
    prompt: str = Field(..., max_length=8000)
    negative_prompt: str = Field("", max_length=8000)
    sampler: str | None = Field(None, max_length=64, description="A1111 sampler name; default: the model's")
    scheduler: str = Field("Automatic", max_length=64, description="A1111 schedule type")
    steps: int | None = Field(None, ge=1, le=1000)
    cfg_scale: float | None = Field(None, ge=0.0, le=50.0)
    seed: int = Field(-1, ge=-1, le=2**32 - 1, description="-1: random (the seed used is recorded)")
    subseed: int = Field(-1, ge=-1, le=2**32 - 1)
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0)
    width: int | None = Field(None, ge=8, le=8192, multiple_of=8)
    height: int | None = Field(None, ge=8, le=8192, multiple_of=8)
    batch_size: int = Field(1, ge=1, le=64)


class Txt2Img(_Diffusion):
    kind: Literal["txt2img"] = "txt2img"


class Img2Img(_Diffusion):
    kind: Literal["img2img"]
    init_image: Base64Image
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)


class Inpaint(_Diffusion):
    kind: Literal["inpaint"]
    init_image: Base64Image
    mask_image: Base64Image = Field(..., description="white: repaint, black: keep")
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    mask_blur: int = Field(4, ge=0, le=64)


class Outpaint(_Diffusion):
    kind: Literal["outpaint"]
    init_image: Base64Image
    left: int = Field(0, ge=0, le=2048, multiple_of=8)
    right: int = Field(0, ge=0, le=2048, multiple_of=8)
    top: int = Field(0, ge=0, le=2048, multiple_of=8)
    bottom: int = Field(0, ge=0, le=2048, multiple_of=8)
    denoising_strength: float = Field(1.0, ge=0.0, le=1.0)


class Upscale(_Spec):
    kind: Literal["upscale"]
    image: Base64Image
    scale: Literal[2, 4] = 2
    upscaler: str | None = Field(None, max_length=64)


class Restore(_Spec):
    kind: Literal["restore"]
    image: Base64Image
    restorer: str | None = Field(None, max_length=64, description="face restorer; default: the server's")
    strength: float = Field(1.0, ge=0.0, le=1.0)


def _kind(value: Any) -> str | None:
    """``kind`` picks the model; a body without one is txt2img."""
    if isinstance(value, dict):
        kind = value.get("kind", "txt2img")
        return kind if kind in KINDS else None
    return getattr(value, "kind", None)


JobSpec = Annotated[
    Union[
        Annotated[Txt2Img, Tag("txt2img")],
        Annotated[Img2Img, Tag("img2img")],
        Annotated[Inpaint, Tag("inpaint")],
        Annotated[Outpaint, Tag("outpaint")],
        Annotated[Upscale, Tag("upscale")],
        Annotated[Restore, Tag("restore")],
    ],
    Discriminator(_kind, custom_error_type="invalid_kind",
                  custom_error_message=f"kind must be one of {', '.join(KINDS)}"),
]

# Fields of each spec that carry images (stored under inputs/ and replaced by their path).
IMAGE_FIELDS = ("init_image", "mask_image", "image")
