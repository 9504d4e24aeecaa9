"""The caller's own account: web login/logout, profile, API keys, credits, webhook secret."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import select

from malerei.serve.accounts import keys, sessions
from malerei.serve.accounts.passwords import verify_password
from malerei.serve.api.deps import CurrentUser, ServicesDep
from malerei.serve.api.schemas import (CreditsPublic, KeyCreate, KeyCreated, KeyList, Login, UserPublic,
                                       WebhookSecret)
from malerei.serve.db.models import ApiKey, CreditEntry, User
from malerei.serve.errors import ApiError, error_responses, not_found
from malerei.serve.jobs.webhooks import HEADER
from malerei.serve.ratelimit import retry_after_header

router = APIRouter(tags=["account"])


def _user_public(user: User) -> dict[str, Any]:
    return {"name": user.name, "is_admin": user.is_admin, "balance": user.balance}


@router.post("/v1/auth/login", response_model=UserPublic, responses=error_responses(401, 422, 429))
def login(services: ServicesDep, body: Login, request: Request, response: Response) -> dict[str, Any]:
    """Start a web session (an HttpOnly, SameSite=Strict cookie)."""
    wait = services.limiter.hit(f"login:{body.username}")
    if wait is not None:
        raise ApiError(429, "rate_limited", "too many login attempts", headers=retry_after_header(wait))
    with services.db.write() as session:
        user = session.scalar(select(User).where(User.name == body.username))
        if not verify_password(user.password_hash if user else None, body.password):
            raise ApiError(401, "invalid_login", "wrong user name or password")
        token = sessions.start_session(session, user, max_age_s=services.settings.session_max_age_s)
    response.set_cookie(sessions.COOKIE, token, max_age=services.settings.session_max_age_s, httponly=True,
                        samesite="strict", secure=request.url.scheme == "https", path="/")
    return _user_public(user)


@router.post("/v1/auth/logout", status_code=204, response_class=Response)
def logout(services: ServicesDep, request: Request) -> Response:
    token = request.cookies.get(sessions.COOKIE)
    if token:
        with services.db.write() as session:
            sessions.end_session(session, token)
    response = Response(status_code=204)
    response.delete_cookie(sessions.COOKIE, path="/")
    return response


@router.get("/v1/account", response_model=UserPublic, responses=error_responses(401, 429))
def me(services: ServicesDep, identity: CurrentUser) -> dict[str, Any]:
    with services.db.read() as session:
        return _user_public(session.get(User, identity.user.id))


@router.get("/v1/account/webhook-secret", response_model=WebhookSecret, responses=error_responses(401, 429))
def webhook_secret(identity: CurrentUser) -> dict[str, Any]:
    """The secret that signs your webhooks: ``HMAC-SHA256(secret, "<t>.<body>")``."""
    return {"secret": identity.user.webhook_secret, "header": HEADER, "scheme": "t=<unix time>,v1=<hex hmac>"}


@router.get("/v1/account/credits", response_model=CreditsPublic, responses=error_responses(401, 429))
def my_credits(services: ServicesDep, identity: CurrentUser) -> dict[str, Any]:
    with services.db.read() as session:
        user = session.get(User, identity.user.id)
        entries = session.scalars(select(CreditEntry).where(CreditEntry.user_id == user.id)
                                  .order_by(CreditEntry.id.desc()).limit(100)).all()
        return {"balance": user.balance, "entries": [
            {"delta": e.delta, "reason": e.reason, "job_id": e.job_id, "note": e.note, "created_at": e.created_at}
            for e in entries]}


def key_public(row: ApiKey) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "created_at": row.created_at, "revoked": row.revoked_at is not None}


@router.get("/v1/account/keys", response_model=KeyList, responses=error_responses(401, 429))
def list_keys(services: ServicesDep, identity: CurrentUser) -> dict[str, Any]:
    with services.db.read() as session:
        rows = session.scalars(select(ApiKey).where(ApiKey.user_id == identity.user.id)
                               .order_by(ApiKey.created_at)).all()
        return {"keys": [key_public(r) for r in rows]}


@router.post("/v1/account/keys", status_code=201, response_model=KeyCreated, responses=error_responses(401, 422, 429))
def create_key(services: ServicesDep, identity: CurrentUser, body: KeyCreate) -> dict[str, Any]:
    """A new API key; the full key is in this answer only."""
    with services.db.write() as session:
        row, token = keys.create_key(session, session.get(User, identity.user.id), name=body.name)
        return {**key_public(row), "key": token}


@router.delete("/v1/account/keys/{key_id}", status_code=204, response_class=Response,
               responses=error_responses(401, 404, 429))
def revoke_key(services: ServicesDep, identity: CurrentUser, key_id: str) -> Response:
    with services.db.write() as session:
        if not keys.revoke_key(session, key_id, user=identity.user):
            raise not_found("API key")
    return Response(status_code=204)
