"""Account routes the web page needs beyond the native API: what the page should show first
(session probe), first-run admin creation, self-registration and the admin's sign-up policy.

Sign-in and sign-out are the native ``/v1/auth/login`` and ``/v1/auth/logout``; a session started
here is the same HttpOnly, SameSite=Strict cookie.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from malerei.serve import credits
from malerei.serve.accounts import sessions
from malerei.serve.accounts.users import UserError, create_user, get_or_create_local_user
from malerei.serve.api.deps import AdminUser, ServicesDep
from malerei.serve.api.schemas import UserPublic
from malerei.serve.context import Services
from malerei.serve.db.models import User
from malerei.serve.errors import ApiError, error_responses
from malerei.serve.ratelimit import retry_after_header
from malerei.serve.web import signup

router = APIRouter(prefix="/v1/web", tags=["web page"])

NAME = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
PASSWORD = Field(..., min_length=8, max_length=1024)


class Limits(BaseModel):
    max_width: int
    max_height: int
    max_pixels: int
    max_steps: int
    max_batch: int
    max_upload_bytes: int


class WebState(BaseModel):
    signed_in: bool
    user: UserPublic | None
    auth: bool = Field(description="false: a single local user, no sign-in")
    credits_enabled: bool
    setup_needed: bool = Field(description="no admin exists yet: the page offers to create the first one")
    registration_open: bool
    default_model: str | None = Field(description="the model of jobs that name none")
    limits: Limits


class FirstAdmin(BaseModel):
    name: str = NAME
    password: str = PASSWORD
    credits: int = Field(1000, ge=0, le=10**9, description="credits the new admin starts with")


class Registration(BaseModel):
    name: str = NAME
    password: str = PASSWORD


class SignupPolicyBody(BaseModel):
    registration_open: bool
    signup_credits: int = Field(0, ge=0, le=10**9)


def _public(user: User) -> dict[str, Any]:
    return {"name": user.name, "is_admin": user.is_admin, "balance": user.balance}


def _admin_exists(session: Any) -> bool:
    return (session.scalar(select(func.count()).select_from(User).where(User.is_admin.is_(True))) or 0) > 0


def _start_session(services: Services, session: Any, user: User) -> str:
    return sessions.start_session(session, user, max_age_s=services.settings.session_max_age_s)


def _set_cookie(services: Services, request: Request, response: Response, token: str) -> None:
    response.set_cookie(sessions.COOKIE, token, max_age=services.settings.session_max_age_s, httponly=True,
                        samesite="strict", secure=request.url.scheme == "https", path="/")


def _throttle(services: Services, request: Request, what: str) -> None:
    host = request.client.host if request.client else "unknown"
    wait = services.limiter.hit(f"{what}:{host}")
    if wait is not None:
        raise ApiError(429, "rate_limited", f"too many attempts; retry in {wait:.1f} s",
                       headers=retry_after_header(wait))


@router.get("/session", response_model=WebState)
def web_state(services: ServicesDep, request: Request) -> dict[str, Any]:
    """Who the browser is signed in as (never 401), and what the page should offer first."""
    s = services.settings
    user = None
    with services.db.read() as session:
        token = request.cookies.get(sessions.COOKIE)
        if s.auth and token:
            found = sessions.session_user(session, token)
            user = _public(found) if found is not None else None
        setup_needed = s.auth and not _admin_exists(session)
    if not s.auth:
        with services.db.write() as session:
            user = _public(get_or_create_local_user(session))
    policy = signup.load(s.data_dir)
    try:
        default_model = services.catalog.resolve(None).name
    except ApiError:
        default_model = None
    return {"signed_in": user is not None, "user": user, "auth": s.auth,
            "credits_enabled": s.credits_enabled and s.auth, "setup_needed": setup_needed,
            "registration_open": s.auth and policy.registration_open, "default_model": default_model,
            "limits": {"max_width": s.max_width, "max_height": s.max_height, "max_pixels": s.max_pixels,
                       "max_steps": s.max_steps, "max_batch": s.max_batch,
                       "max_upload_bytes": s.max_upload_bytes}}


@router.post("/setup", status_code=201, response_model=UserPublic, responses=error_responses(409, 422, 429))
def first_admin(services: ServicesDep, body: FirstAdmin, request: Request, response: Response) -> dict[str, Any]:
    """Create the first admin account on a fresh install (no admin yet) and sign it in.

    Refused (409) once any admin exists, or when authentication is off."""
    _throttle(services, request, "web-setup")
    if not services.settings.auth:
        raise ApiError(409, "setup_not_needed", "authentication is off: this server has no accounts to set up")
    with services.db.write() as session:  # one writer at a time: two first admins cannot both win
        if _admin_exists(session):
            raise ApiError(409, "already_set_up", "an admin account already exists; sign in instead")
        try:
            user = create_user(session, body.name, password=body.password, is_admin=True)
        except UserError as exc:
            raise ApiError(409, "user_exists", str(exc)) from None
        if body.credits:
            credits.grant(session, user, body.credits, note="first-run setup")
            session.refresh(user)
        token = _start_session(services, session, user)
        result = _public(user)
    _set_cookie(services, request, response, token)
    return result


@router.post("/register", status_code=201, response_model=UserPublic,
             responses=error_responses(403, 409, 422, 429))
def register(services: ServicesDep, body: Registration, request: Request, response: Response) -> dict[str, Any]:
    """Create a (non-admin) account and sign it in, when the admin has opened registration."""
    _throttle(services, request, "web-register")
    policy = signup.load(services.settings.data_dir)
    if not (services.settings.auth and policy.registration_open):
        raise ApiError(403, "registration_closed", "registration is closed: ask an admin for an account")
    with services.db.write() as session:
        try:
            user = create_user(session, body.name, password=body.password)
        except UserError as exc:
            raise ApiError(409, "user_exists", str(exc)) from None
        if policy.signup_credits:
            credits.grant(session, user, policy.signup_credits, note="registration")
            session.refresh(user)
        token = _start_session(services, session, user)
        result = _public(user)
    _set_cookie(services, request, response, token)
    return result


@router.get("/admin/signup", response_model=SignupPolicyBody, responses=error_responses(401, 403, 429))
def get_policy(services: ServicesDep, _: AdminUser) -> dict[str, Any]:
    policy = signup.load(services.settings.data_dir)
    return {"registration_open": policy.registration_open, "signup_credits": policy.signup_credits}


@router.put("/admin/signup", response_model=SignupPolicyBody, responses=error_responses(401, 403, 422, 429))
def put_policy(services: ServicesDep, _: AdminUser, body: SignupPolicyBody) -> dict[str, Any]:
    """Open or close self-registration, and set the credits a new account starts with."""
    signup.save(services.settings.data_dir, signup.SignupPolicy(registration_open=body.registration_open,
                                                                signup_credits=body.signup_credits))
    return body.model_dump()
