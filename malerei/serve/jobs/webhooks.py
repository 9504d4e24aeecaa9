"""Webhooks: an HMAC-signed POST when a job finishes, retried with exponential backoff.

The signature follows Stripe's scheme: header ``Malerei-Signature: t=<unix time>,v1=<hex>``
where ``v1 = HMAC-SHA256(user's webhook secret, "<t>.<raw body>")``. Receivers verify it with the
secret from ``GET /v1/account/webhook-secret`` and reject old timestamps. Delivery state lives in
the job row, so pending webhooks survive restarts; a worker claims a delivery by moving its
``webhook_next_at`` forward before sending, so two workers do not both send it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from urllib.parse import urlsplit

from sqlalchemy import select

from malerei.serve.context import Services
from malerei.serve.db.models import Job, User
from malerei.serve.jobs.service import load_job_view

log = logging.getLogger("malerei.serve.webhooks")

HEADER = "Malerei-Signature"


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, body: bytes, header: str, *, tolerance_s: int = 300) -> bool:
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp).encode(), header.encode())


def _public_address(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    for info in infos:
        addr = ipaddress.ip_address(info[4][0])
        if not addr.is_global:
            return False
    return True


class WebhookSender:
    def __init__(self, services: Services) -> None:
        self.services = services

    def deliver_due(self, limit: int = 10) -> int:
        s = self.services.settings
        now = time.time()
        with self.services.db.write() as session:
            jobs = session.scalars(select(Job).where(Job.webhook_status == "pending", Job.webhook_next_at <= now)
                                   .order_by(Job.webhook_next_at).limit(limit)
                                   .with_for_update(skip_locked=True)).all()  # PostgreSQL: one sender each
            claimed = []
            for job in jobs:
                job.webhook_next_at = now + s.webhook_timeout_s + 30  # ours while we try
                user = session.get(User, job.user_id)
                claimed.append((job.id, job.webhook_url, job.webhook_attempts, user.webhook_secret))
        for job_id, url, attempts, secret in claimed:
            self._send(job_id, url, attempts, secret)
        return len(claimed)

    def _send(self, job_id: str, url: str, attempts: int, secret: str) -> None:
        import httpx

        s = self.services.settings
        body = json.dumps({"type": "job.finished", "job": load_job_view(self.services, job_id)},
                          sort_keys=True).encode()
        error = None
        try:
            if not s.webhook_allow_private and not _public_address(url):
                error = "refused: the webhook URL resolves to a private or loopback address"
            else:
                response = httpx.post(url, content=body, timeout=s.webhook_timeout_s, follow_redirects=False,
                                      headers={"Content-Type": "application/json",
                                               HEADER: sign(secret, body, int(time.time())),
                                               "User-Agent": "malerei-webhooks/1"})
                if not 200 <= response.status_code < 300:
                    error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        with self.services.db.write() as session:
            job = session.get(Job, job_id)
            job.webhook_attempts = attempts + 1
            if error is None:
                job.webhook_status, job.webhook_last_error, job.webhook_next_at = "delivered", None, None
                return
            job.webhook_last_error = error[:500]
            if job.webhook_attempts >= s.webhook_max_attempts or error.startswith("refused"):
                job.webhook_status, job.webhook_next_at = "failed", None
            else:
                job.webhook_next_at = time.time() + s.webhook_backoff_s * 2 ** attempts
        log.info("webhook for %s: %s", job_id, error or "delivered")
