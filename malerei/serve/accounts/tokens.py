"""Random identifiers and secret hashing shared by keys, sessions, jobs and images."""

from __future__ import annotations

import hashlib
import hmac
import secrets


def new_id(prefix: str, nbytes: int = 16) -> str:
    """An unguessable id such as ``job_3Jk...`` (128 random bits by default)."""
    return f"{prefix}_{secrets.token_urlsafe(nbytes)}"


def digest(secret: str) -> str:
    """Hash of a high-entropy secret (API key, session token). Not for passwords."""
    return hashlib.sha256(secret.encode()).hexdigest()


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
