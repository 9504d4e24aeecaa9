"""The FastAPI application. ``create_app(settings)`` builds everything; importing does nothing."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from malerei.serve import errors
from malerei.serve.config import Settings
from malerei.serve.context import Services, build_services
from malerei.serve.jobs.engine import Engine

log = logging.getLogger("malerei.serve.http")

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


class Guard:
    """ASGI middleware: caps request bodies, adds security headers, logs without secrets.

    The log line has method, path (no query string: signed URLs carry signatures), status and
    time; headers (credentials, cookies) are never logged."""

    def __init__(self, app: ASGIApp, *, services: Services, max_body: int) -> None:
        self.app = app
        self.services = services
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_holder = {"status": 500}
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await self._reject(scope, send, status_holder)
            self._log(scope, status_holder["status"], started)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _TooLarge()
            return message

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message = {**message, "headers": list(message.get("headers", [])) + SECURITY_HEADERS}
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_headers)
        except _TooLarge:
            await self._reject(scope, send, status_holder)
        finally:
            self._log(scope, status_holder["status"], started)

    async def _reject(self, scope: Scope, send: Send, status_holder: dict[str, int]) -> None:
        response = errors.render(scope["path"], errors.ApiError(
            413, "request_too_large", f"the request body is larger than {self.max_body} bytes"))
        status_holder["status"] = 413

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + SECURITY_HEADERS}
            await send(message)

        async def no_body() -> Message:
            return {"type": "http.disconnect"}

        await response(scope, no_body, send_with_headers)

    def _log(self, scope: Scope, status: int, started: float) -> None:
        self.services.metrics.count_request(scope.get("method", "?"), status)
        log.info("%s %s %d %.1fms", scope.get("method"), scope.get("path"), status,
                 (time.perf_counter() - started) * 1000)


class _TooLarge(Exception):
    pass


def create_app(settings: Settings, *, engine: Engine | None = None, services: Services | None = None) -> FastAPI:
    """Build the app: migrate the database, wire services, and (on startup) start the in-process
    worker when ``settings.in_process_worker`` is set. ``engine`` replaces the real engine."""
    from malerei.serve.api.routes import a1111, account, admin, gallery, jobs, openai, stability, system

    settings.check()
    services = services or build_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker = feed = None
        if services.db.is_postgresql:
            from malerei.serve.jobs.changes import PostgresChangeFeed

            feed = PostgresChangeFeed(services.db.url, services.changes).start()
        if settings.in_process_worker:
            from malerei.serve.jobs.worker import Worker

            worker = Worker(services, engine or make_engine(settings))
            worker.start()
        app.state.worker = worker
        try:
            yield
        finally:
            if worker is not None:
                worker.stop()
            if feed is not None:
                feed.stop()

    app = FastAPI(title="malerei", version="1", lifespan=lifespan,
                  description="A DreamStudio of your own: native jobs API, gallery, accounts and credits, "
                              "plus OpenAI Images, A1111 /sdapi/v1 and Stability v1 compatible APIs. "
                              "Authenticate with `Authorization: Bearer <API key>`.")
    app.state.services = services
    errors.install(app)
    errors.document_errors(app)
    for module in (system, account, jobs, gallery, admin, openai, a1111, stability):
        app.include_router(module.router)
    from malerei.serve.web.router import router as web_page  # the web page at / (malerei/serve/web/)
    app.include_router(web_page)
    max_body = int(settings.max_upload_bytes * 2.8) + (1 << 20)
    app.add_middleware(Guard, services=services, max_body=max_body)
    return app


def make_engine(settings: Settings) -> Engine:
    """The engine the worker uses: ``malerei.engine``, or the ``module:factory`` named by
    ``$MALEREI_SERVE_ENGINE`` (a factory taking the settings), for other engines."""
    import importlib
    import os

    spec = os.environ.get("MALEREI_SERVE_ENGINE")
    if spec:
        module, _, name = spec.partition(":")
        return getattr(importlib.import_module(module), name)(settings)
    from malerei.serve.catalog import ModelCatalog
    from malerei.serve.jobs.engine import RealEngine

    return RealEngine(catalog=ModelCatalog(settings.resolved_models_dir, default=settings.default_model),
                      device=settings.device, dtype=settings.dtype)
