"""The credit ledger.

Every change is a :class:`CreditEntry`; ``users.balance`` is their sum, kept beside it so that a
charge is a single conditional ``UPDATE ... WHERE balance >= cost``: atomic on SQLite and
PostgreSQL alike, so parallel submissions can never overdraw. A job is charged once and
refunded at most once (a unique constraint on job + reason).
"""

from __future__ import annotations

import math
import time

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from malerei.serve.db.models import CreditEntry, User


class InsufficientCredits(Exception):
    def __init__(self, needed: int, balance: int) -> None:
        super().__init__(f"this job costs {needed} credits but the balance is {balance}")
        self.needed = needed
        self.balance = balance


def job_cost(*, images: int, width: int, height: int, steps: int, unit: int) -> int:
    """Credits for a job: by pixels and steps, at least 1."""
    return max(1, math.ceil(images * width * height * max(1, steps) / unit))


def grant(session: Session, user: User, amount: int, *, note: str = "") -> int:
    """Add (or with a negative amount, remove) credits; returns the new balance."""
    session.add(CreditEntry(user_id=user.id, delta=amount, reason="grant", note=note, created_at=time.time()))
    session.execute(update(User).where(User.id == user.id).values(balance=User.balance + amount))
    return session.scalar(select(User.balance).where(User.id == user.id))


def charge(session: Session, user_id: int, job_id: str, cost: int) -> None:
    """Debit ``cost`` for ``job_id`` or raise :class:`InsufficientCredits`; nothing is written then."""
    done = session.execute(
        update(User).where(User.id == user_id, User.balance >= cost).values(balance=User.balance - cost)
    )
    if done.rowcount != 1:
        balance = session.scalar(select(User.balance).where(User.id == user_id)) or 0
        raise InsufficientCredits(cost, balance)
    session.add(CreditEntry(user_id=user_id, delta=-cost, reason="charge", job_id=job_id, created_at=time.time()))


def refund(session: Session, user_id: int, job_id: str, *, note: str = "") -> bool:
    """Give back what ``job_id`` was charged, once. False when nothing was charged or already refunded."""
    charged = session.scalar(select(CreditEntry).where(CreditEntry.job_id == job_id, CreditEntry.reason == "charge"))
    if charged is None:
        return False
    already = session.scalar(select(CreditEntry.id).where(CreditEntry.job_id == job_id, CreditEntry.reason == "refund"))
    if already is not None:
        return False
    try:
        with session.begin_nested():
            session.add(CreditEntry(user_id=user_id, delta=-charged.delta, reason="refund", job_id=job_id,
                                    note=note[:255], created_at=time.time()))
    except IntegrityError:
        return False
    session.execute(update(User).where(User.id == user_id).values(balance=User.balance - charged.delta))
    return True


def balance(session: Session, user_id: int) -> int:
    return session.scalar(select(User.balance).where(User.id == user_id)) or 0


def ledger_sum(session: Session, user_id: int) -> int:
    """The balance recomputed from the ledger (tests and audits compare it with ``balance``)."""
    from sqlalchemy import func

    return session.scalar(select(func.coalesce(func.sum(CreditEntry.delta), 0)).where(CreditEntry.user_id == user_id))
