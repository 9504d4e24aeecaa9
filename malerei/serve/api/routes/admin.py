"""Admin routes: users, credits, keys (the same operations as the admin CLI)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from sqlalchemy import select

from malerei.serve import credits
from malerei.serve.accounts import keys
from malerei.serve.accounts.users import UserError, create_user, get_user
from malerei.serve.api.deps import AdminUser, ServicesDep
from malerei.serve.api.routes.account import key_public
from malerei.serve.api.schemas import CreditGrant, KeyCreate, KeyCreated, UserCreate, UserPublic
from malerei.serve.db.models import User
from malerei.serve.errors import ApiError, error_responses, not_found

router = APIRouter(prefix="/v1/admin", tags=["admin"])


def _user(session: Any, name: str) -> User:
    try:
        return get_user(session, name)
    except UserError:
        raise not_found("user") from None


@router.get("/users", response_model=list[UserPublic], responses=error_responses(401, 403, 429))
def list_users(services: ServicesDep, _: AdminUser) -> list[dict[str, Any]]:
    with services.db.read() as session:
        return [{"name": u.name, "is_admin": u.is_admin, "balance": u.balance}
                for u in session.scalars(select(User).order_by(User.id))]


@router.post("/users", status_code=201, response_model=UserPublic, responses=error_responses(401, 403, 409, 422, 429))
def add_user(services: ServicesDep, _: AdminUser, body: UserCreate) -> dict[str, Any]:
    with services.db.write() as session:
        try:
            user = create_user(session, body.name, password=body.password, is_admin=body.is_admin)
        except UserError as exc:
            raise ApiError(409, "user_exists", str(exc)) from None
        return {"name": user.name, "is_admin": user.is_admin, "balance": user.balance}


@router.post("/users/{name}/credits", response_model=UserPublic, responses=error_responses(401, 403, 404, 422, 429))
def add_credits(services: ServicesDep, admin: AdminUser, name: str, body: CreditGrant) -> dict[str, Any]:
    with services.db.write() as session:
        user = _user(session, name)
        balance = credits.grant(session, user, body.amount, note=body.note or f"by {admin.user.name}")
        return {"name": user.name, "is_admin": user.is_admin, "balance": balance}


@router.post("/users/{name}/keys", status_code=201, response_model=KeyCreated,
             responses=error_responses(401, 403, 404, 422, 429))
def add_key(services: ServicesDep, _: AdminUser, name: str, body: KeyCreate) -> dict[str, Any]:
    with services.db.write() as session:
        row, token = keys.create_key(session, _user(session, name), name=body.name)
        return {**key_public(row), "key": token}


@router.delete("/keys/{key_id}", status_code=204, response_class=Response, responses=error_responses(401, 403, 404, 429))
def revoke(services: ServicesDep, _: AdminUser, key_id: str) -> Response:
    with services.db.write() as session:
        if not keys.revoke_key(session, key_id):
            raise not_found("API key")
    return Response(status_code=204)
