"""Request dependencies: services, the caller's identity, and the one ownership check.

Identity comes only from verified credentials: an API key as a Bearer token, or a web session
cookie set by ``/v1/auth/login``. With authentication off (loopback only) every caller is the
single ``local`` user. Ownership of jobs and images is checked in :func:`owned` and nowhere else:
another user's id answers 404 exactly like an id that does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Path, Request

from malerei.serve.accounts import keys, sessions
from malerei.serve.accounts.users import get_or_create_local_user
from malerei.serve.context import Services
from malerei.serve.db.models import Image, Job, User
from malerei.serve.errors import ApiError, not_found, unauthorized
from malerei.serve.ratelimit import retry_after_header


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


@dataclass(frozen=True)
class Identity:
    user: User
    api_key_id: str | None  # None for a web session or the local user


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("the Authorization header must be 'Bearer <API key>'")
    return token.strip()


def current_identity(request: Request, services: ServicesDep) -> Identity:
    settings = services.settings
    token = _bearer(request)
    with services.db.read() as session:
        if token is not None:
            found = keys.verify_key(session, token)
            if found is None:
                raise unauthorized("invalid or revoked API key")
            identity = Identity(user=found[0], api_key_id=found[1].id)
        elif (cookie := request.cookies.get(sessions.COOKIE)) and (user := sessions.session_user(session, cookie)):
            identity = Identity(user=user, api_key_id=None)
        elif not settings.auth:
            identity = None
        else:
            raise unauthorized()
    if identity is None:
        with services.db.write() as session:
            identity = Identity(user=get_or_create_local_user(session), api_key_id=None)
    wait = services.limiter.hit(identity.api_key_id or f"user:{identity.user.id}")
    if wait is not None:
        raise ApiError(429, "rate_limited", f"too many requests; retry in {wait:.1f} s",
                       headers=retry_after_header(wait))
    return identity


CurrentUser = Annotated[Identity, Depends(current_identity)]


def admin_identity(identity: CurrentUser) -> Identity:
    if not identity.user.is_admin:
        raise ApiError(403, "forbidden", "this needs an admin account")
    return identity


AdminUser = Annotated[Identity, Depends(admin_identity)]

T = TypeVar("T", Job, Image)


def owned(services: Services, model: type[T], object_id: str, identity: Identity) -> T:
    """The row ``object_id`` of ``model`` if it belongs to the caller, else 404 (never 403)."""
    label = {Job: "job", Image: "image"}[model]
    with services.db.read() as session:
        row = session.get(model, object_id)
        if row is None or row.user_id != identity.user.id:
            raise not_found(label)
        session.expunge(row)
        return row


def owned_job(services: ServicesDep, identity: CurrentUser,
              job_id: Annotated[str, Path(max_length=64)]) -> Job:
    return owned(services, Job, job_id, identity)


def owned_image(services: ServicesDep, identity: CurrentUser,
                image_id: Annotated[str, Path(max_length=64)]) -> Image:
    return owned(services, Image, image_id, identity)


OwnedJob = Annotated[Job, Depends(owned_job)]
OwnedImage = Annotated[Image, Depends(owned_image)]
