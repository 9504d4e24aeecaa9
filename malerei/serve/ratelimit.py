"""Per-key request rate limits: a token bucket per API key (or web session user).

:class:`TokenBuckets` keeps the buckets in process memory (one API server). With a Redis queue
configured, :class:`RedisTokenBuckets` keeps them in Redis, so every API server behind a load
balancer draws from the same bucket.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Protocol

log = logging.getLogger("malerei.serve.ratelimit")


class RateLimiter(Protocol):
    def hit(self, key: str) -> float | None:
        """Record one request; None if allowed, else seconds until the next one would be."""


class TokenBuckets:
    def __init__(self, *, per_minute: int, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = max(1, burst)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str) -> float | None:
        if self.rate <= 0:
            return None
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return None
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


# KEYS: the bucket; ARGV: tokens per second, burst -> seconds to wait ("0": allowed), as text
# (a Lua number returned to Redis would be cut to an integer). Redis's clock: servers agree.
_HIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, last = tonumber(b[1]) or burst, tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""


class RedisTokenBuckets:
    """The same token buckets, kept in Redis (one hash per key, expiring once full again).

    When Redis cannot be reached the request is let through (and a warning logged): a Redis
    outage should not take the API down with it."""

    def __init__(self, client, *, prefix: str, per_minute: int, burst: int) -> None:  # noqa: ANN001 - redis.Redis
        self.client = client
        self.prefix = prefix + "rl:"
        self.rate = per_minute / 60.0
        self.burst = max(1, burst)
        self._hit = client.register_script(_HIT)

    def hit(self, key: str) -> float | None:
        import redis

        if self.rate <= 0:
            return None
        try:
            wait = float(self._hit(keys=[self.prefix + key], args=[repr(self.rate), self.burst]))
        except redis.RedisError:
            log.warning("rate limit not checked: Redis failed", exc_info=True)
            return None
        return wait if wait > 0 else None


def retry_after_header(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}
