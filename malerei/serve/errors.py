"""One error body per API family, built in one place.

Native routes answer ``{"error": {"code": "...", "message": "..."}}``. The compatible APIs keep
the shapes their clients parse: OpenAI ``{"error": {"message", "type", "param", "code"}}``,
A1111 ``{"error", "detail", "body", "errors"}``, Stability ``{"id", "name", "message"}``.
Which family answers is decided by the request path, so routes only raise :class:`ApiError`.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from malerei.engine.errors import ImageError, InvalidParameter, MalereiError, ModelNotFound

log = logging.getLogger("malerei.serve")


class ApiError(Exception):
    """An answer other than success: HTTP status, a stable machine code and a human message."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None,
                 details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.details = details


def not_found(what: str = "resource") -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def unauthorized(message: str = "missing or invalid credentials: send 'Authorization: Bearer <API key>'") -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorBody(BaseModel):
    """The native error shape: stable across versions."""

    error: ErrorDetail


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting the native error body."""
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS.get(code, "error")} for code in codes}


_DESCRIPTIONS = {
    400: "bad input", 401: "not authenticated", 415: "unsupported image format", 402: "not enough credits", 403: "not allowed",
    404: "not found (or not yours)", 409: "conflict", 413: "too large", 422: "invalid parameters",
    429: "rate limited", 503: "unavailable",
}


# ------------------------------------------------------------------ family shapes
def family(path: str) -> str:
    if path.startswith("/sdapi/"):
        return "a1111"
    if path.startswith(("/v1/images/generations", "/v1/images/edits", "/v1/images/variations")):
        return "openai"
    if path.startswith(("/v1/generation/", "/v1/engines/", "/v1/user/")):
        return "stability"
    return "native"


_OPENAI_TYPES = {401: "invalid_request_error", 402: "insufficient_quota", 429: "rate_limit_error"}
_STABILITY_NAMES = {400: "bad_request", 401: "unauthorized", 402: "insufficient_balance",
                    403: "permission_denied", 404: "not_found", 422: "invalid_parameters",
                    429: "rate_limit_exceeded"}


def render(path: str, err: ApiError) -> JSONResponse:
    kind = family(path)
    if kind == "openai":
        kind_type = _OPENAI_TYPES.get(err.status, "server_error" if err.status >= 500 else "invalid_request_error")
        body: dict[str, Any] = {"error": {"message": err.message, "type": kind_type, "param": None, "code": err.code}}
    elif kind == "a1111":
        body = {"error": err.code, "detail": err.message, "body": "", "errors": err.message}
    elif kind == "stability":
        name = _STABILITY_NAMES.get(err.status, "server_error" if err.status >= 500 else err.code)
        body = {"id": uuid.uuid4().hex, "name": name, "message": err.message}
    else:
        detail: dict[str, Any] = {"code": err.code, "message": err.message}
        if err.details:
            detail["details"] = err.details
        body = {"error": detail}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def from_engine_error(exc: MalereiError) -> ApiError:
    if isinstance(exc, ModelNotFound):
        return ApiError(422, "model_not_found", str(exc))
    if isinstance(exc, ImageError):
        return ApiError(400, "invalid_image", str(exc))
    if isinstance(exc, InvalidParameter):
        return ApiError(422, "invalid_parameter", str(exc))
    return ApiError(400, "bad_request", str(exc))


def _validation_error(exc: RequestValidationError) -> ApiError:
    details = []
    for item in exc.errors():
        loc = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
        details.append({"loc": loc, "message": str(item.get("msg", ""))})
    summary = "; ".join(f"{d['loc'] or 'body'}: {d['message']}" for d in details[:5])
    return ApiError(422, "invalid_request", summary or "invalid request", details=details)


_STRING = {"type": "string"}
FAMILY_SCHEMAS: dict[str, dict[str, Any]] = {
    "native": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": _STRING, "message": _STRING, "details": {"type": "array", "items": {"type": "object"}}}}}},
    "openai": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": _STRING, "type": _STRING, "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"]}}}}},
    "a1111": {"type": "object", "required": ["error", "detail", "body", "errors"],
              "properties": {"error": _STRING, "detail": _STRING, "body": _STRING, "errors": _STRING}},
    "stability": {"type": "object", "required": ["id", "name", "message"],
                  "properties": {"id": _STRING, "name": _STRING, "message": _STRING}},
}
ERROR_CODES = (400, 401, 402, 403, 404, 409, 413, 415, 422, 429)


def document_errors(app: FastAPI) -> None:
    """Make the OpenAPI document say what errors really look like: every operation lists the
    error statuses with its family's body (replacing FastAPI's default 422 schema)."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path, operations in spec.get("paths", {}).items():
            schema = FAMILY_SCHEMAS[family(path)]
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                for code in ERROR_CODES:
                    entry = responses.get(str(code))
                    if entry is None or "HTTPValidationError" in str(entry) or code >= 400:
                        responses[str(code)] = {"description": _DESCRIPTIONS.get(code, "error"),
                                                "content": {"application/json": {"schema": schema}}}
        spec.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
        spec.get("components", {}).get("schemas", {}).pop("ValidationError", None)
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI) -> None:
    """Route every failure through :func:`render`."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return render(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return render(request.url.path, _validation_error(exc))

    @app.exception_handler(MalereiError)
    async def _engine(request: Request, exc: MalereiError) -> JSONResponse:
        return render(request.url.path, from_engine_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 400: "bad_request"}
        message = exc.detail if isinstance(exc.detail, str) else "error"
        headers = dict(exc.headers or {})
        return render(request.url.path, ApiError(exc.status_code, codes.get(exc.status_code, "error"),
                                                 message, headers=headers))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return render(request.url.path, ApiError(500, "internal_error", "internal error; see the server log"))
