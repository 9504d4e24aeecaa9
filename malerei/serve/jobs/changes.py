"""Wake-ups for the event streams of this process when its own worker changes a job.

An event stream (``GET /v1/jobs/{id}/events``) reads its job from the database. Polling it
often costs every open stream a query many times a second, and polling rarely delays the
``done`` event: clients resubmit late, and under load the worker's next batch starts without
them. The in-process worker calls :meth:`JobChanges.changed` after every write, and the streams
read at once. Workers in other processes are not seen here; streams still poll for those.
"""

from __future__ import annotations

import asyncio
import threading


class JobChanges:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def changed(self) -> None:
        """Some job changed (called from any thread)."""
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # its loop has closed: the stream is gone
                pass

    def listen(self) -> Listener:
        return Listener(self)


class Listener:
    """One stream's subscription (a context manager inside the stream's coroutine)."""

    def __init__(self, changes: JobChanges) -> None:
        self._changes = changes
        self._event = asyncio.Event()
        self._key = (asyncio.get_running_loop(), self._event)

    def __enter__(self) -> Listener:
        with self._changes._lock:
            self._changes._waiters.add(self._key)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._changes._lock:
            self._changes._waiters.discard(self._key)

    async def wait(self, timeout: float) -> bool:
        """Until a change (True) or ``timeout`` seconds (False); a change since the last wait counts."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            self._event.clear()
        return True
