"""Creating and finding users."""

from __future__ import annotations

import re
import secrets
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from malerei.serve.accounts.passwords import hash_password
from malerei.serve.db.models import User

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class UserError(ValueError):
    """A user cannot be created or found as asked."""


def create_user(session: Session, name: str, *, password: str | None = None, is_admin: bool = False) -> User:
    if not NAME_RE.match(name):
        raise UserError(f"invalid user name {name!r}: use 1-64 letters, digits, '_', '.' or '-'")
    if session.scalar(select(User).where(User.name == name)) is not None:
        raise UserError(f"user {name!r} already exists")
    user = User(name=name, password_hash=hash_password(password) if password is not None else None,
                is_admin=is_admin, balance=0, webhook_secret=secrets.token_hex(32), options={},
                created_at=time.time())
    session.add(user)
    session.flush()
    return user


def get_user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise UserError(f"no user named {name!r}")
    return user


def get_or_create_local_user(session: Session) -> User:
    """The single user of a server run with authentication off (loopback only)."""
    user = session.scalar(select(User).where(User.name == "local"))
    return user or create_user(session, "local")
