"""Web sessions: a random cookie token; the database keeps only its hash."""

from __future__ import annotations

import secrets
import time

from sqlalchemy import delete
from sqlalchemy.orm import Session

from malerei.serve.accounts.tokens import digest
from malerei.serve.db.models import User, WebSession

COOKIE = "malerei_session"


def start_session(session: Session, user: User, *, max_age_s: int) -> str:
    token = secrets.token_urlsafe(32)
    now = time.time()
    session.add(WebSession(id=digest(token), user_id=user.id, created_at=now, expires_at=now + max_age_s))
    return token


def session_user(session: Session, token: str) -> User | None:
    row = session.get(WebSession, digest(token))
    if row is None or row.expires_at < time.time():
        return None
    return session.get(User, row.user_id)


def end_session(session: Session, token: str) -> None:
    session.execute(delete(WebSession).where(WebSession.id == digest(token)))
