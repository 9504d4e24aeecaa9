"""API keys: ``mk_<key id>_<secret>``. Only a hash of the secret is stored; the key is shown once."""

from __future__ import annotations

import secrets
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from malerei.serve.accounts.tokens import digest, same
from malerei.serve.db.models import ApiKey, User

PREFIX = "mk"


def create_key(session: Session, user: User, *, name: str = "") -> tuple[ApiKey, str]:
    """Make a key for ``user``; returns the row and the full key (never stored)."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    row = ApiKey(id=key_id, user_id=user.id, secret_hash=digest(secret), name=name, created_at=time.time())
    session.add(row)
    session.flush()
    return row, f"{PREFIX}_{key_id}_{secret}"


def split_key(token: str) -> tuple[str, str] | None:
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def verify_key(session: Session, token: str) -> tuple[User, ApiKey] | None:
    """The user and key behind ``token``, or None if it is malformed, unknown or revoked."""
    parts = split_key(token)
    if parts is None:
        return None
    key_id, secret = parts
    row = session.get(ApiKey, key_id)
    if row is None or row.revoked_at is not None or not same(row.secret_hash, digest(secret)):
        return None
    user = session.get(User, row.user_id)
    return (user, row) if user is not None else None


def revoke_key(session: Session, key_id: str, *, user: User | None = None) -> bool:
    """Revoke a key (only ``user``'s own when given). False when there is no such key."""
    query = select(ApiKey).where(ApiKey.id == key_id)
    if user is not None:
        query = query.where(ApiKey.user_id == user.id)
    row = session.scalar(query)
    if row is None:
        return False
    if row.revoked_at is None:
        row.revoked_at = time.time()
    return True
