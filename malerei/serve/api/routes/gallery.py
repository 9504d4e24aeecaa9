"""The per-user gallery: list, search by prompt, metadata, download (PNG with metadata), delete.

``/v1/files/{image_id}`` serves an image without credentials when the URL carries a valid
signature (OpenAI-style ``url`` results); a missing or wrong signature answers 404.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from sqlalchemy import select

from malerei.serve.accounts.tokens import same
from malerei.serve.api.deps import CurrentUser, OwnedImage, ServicesDep
from malerei.serve.api.schemas import ImageList, ImagePublic
from malerei.serve.context import Services
from malerei.serve.db.models import Image
from malerei.serve.errors import error_responses, not_found
from malerei.serve.jobs.service import image_public

router = APIRouter(tags=["gallery"])

PNG_RESPONSE = {200: {"content": {"image/png": {}}, "description": "the PNG, with its generation metadata"}}


@router.get("/v1/images", response_model=ImageList, responses=error_responses(401, 422, 429))
def list_images(services: ServicesDep, identity: CurrentUser,
                q: Annotated[str | None, Query(max_length=500, description="words the prompt contains")] = None,
                limit: Annotated[int, Query(ge=1, le=200)] = 50,
                cursor: Annotated[str | None, Query(max_length=100)] = None) -> dict[str, Any]:
    """Newest first. ``q`` matches prompts containing all of its words (case-insensitive)."""
    query = select(Image).where(Image.user_id == identity.user.id)
    for word in (q or "").split()[:10]:
        escaped = word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(Image.prompt.ilike(f"%{escaped}%", escape="\\"))
    if cursor:
        created, _, image_id = cursor.partition(":")
        try:
            created_at = float(created)
        except ValueError:
            created_at = float("inf")
        query = query.where((Image.created_at < created_at) |
                            ((Image.created_at == created_at) & (Image.id < image_id)))
    with services.db.read() as session:
        rows = session.scalars(query.order_by(Image.created_at.desc(), Image.id.desc()).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = f"{rows[-1].created_at!r}:{rows[-1].id}" if more and rows else None
    return {"images": [image_public(r) for r in rows], "next_cursor": next_cursor}


@router.get("/v1/images/{image_id}", response_model=ImagePublic, responses=error_responses(401, 404, 429))
def get_image(image: OwnedImage) -> dict[str, Any]:
    return image_public(image)


def _png(services: Services, image: Image) -> Response:
    try:
        data = services.images.read(image.path)
    except FileNotFoundError:
        raise not_found("image file") from None
    return Response(data, media_type="image/png", headers={
        "Content-Disposition": f'attachment; filename="{image.id}.png"',
        "Cache-Control": "private, max-age=86400"})


@router.get("/v1/images/{image_id}/file", response_class=Response,
            responses={**PNG_RESPONSE, **error_responses(401, 404, 429)})
def download_image(services: ServicesDep, image: OwnedImage) -> Response:
    return _png(services, image)


@router.delete("/v1/images/{image_id}", status_code=204, response_class=Response,
               responses=error_responses(401, 404, 429))
def delete_image(services: ServicesDep, image: OwnedImage) -> Response:
    with services.db.write() as session:
        row = session.get(Image, image.id)
        if row is not None:
            session.delete(row)
    services.images.delete(image.path)
    return Response(status_code=204)


# ----------------------------------------------------------------------------- signed URLs
def signature(secret: str, image_id: str, expires: int) -> str:
    return hmac.new(secret.encode(), f"{image_id}:{expires}".encode(), hashlib.sha256).hexdigest()


def signed_url(services: Services, image_id: str, *, ttl_s: int = 3600) -> str:
    expires = int(time.time()) + ttl_s
    return f"/v1/files/{image_id}?expires={expires}&signature={signature(services.settings.secret_key, image_id, expires)}"


@router.get("/v1/files/{image_id}", response_class=Response, responses={**PNG_RESPONSE, **error_responses(404)})
def signed_download(services: ServicesDep, image_id: str, expires: Annotated[int, Query(ge=0, le=2**40)] = 0,
                    signature_: Annotated[str, Query(alias="signature", max_length=128)] = "") -> Response:
    """An image by a signed, expiring URL (as returned in OpenAI ``url`` results)."""
    good = signature(services.settings.secret_key, image_id, expires)
    if expires < time.time() or not same(good, signature_):  # bytes compare: any text is safe
        raise not_found("image")
    with services.db.read() as session:
        image = session.get(Image, image_id)
    if image is None:
        raise not_found("image")
    return _png(services, image)
