"""Health, metrics, and what this server offers (models, samplers)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from sqlalchemy import text

from malerei.serve.api.deps import CurrentUser, ServicesDep
from malerei.serve.api.schemas import Health, ModelList
from malerei.serve.errors import error_responses

router = APIRouter(tags=["system"])


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
def healthz(services: ServicesDep, response: Response) -> dict[str, Any]:
    answer: dict[str, Any] = {"status": "ok", "database": "ok", "queue": "ok", "queue_depth": -1}
    try:
        with services.db.read() as session:
            session.execute(text("SELECT 1"))
        answer["queue_depth"] = services.queue.depth()
    except Exception:  # noqa: BLE001 - health reports, it does not raise
        answer["database"] = "error"
    ping = getattr(services.queue, "ping", None)  # a queue outside the database (Redis)
    if ping is not None:
        try:
            ping()
        except Exception:  # noqa: BLE001
            answer["queue"] = "error"
    if "error" in (answer["database"], answer["queue"]):
        response.status_code = 503
        answer["status"] = "unavailable"
    return answer


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
def metrics(services: ServicesDep) -> Response:
    return Response(services.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 429))
def models(services: ServicesDep, _: CurrentUser) -> dict[str, Any]:
    catalog = services.catalog
    return {"models": [{"name": m.name, "title": m.title, "defaults": m.defaults} for m in catalog.models()],
            "samplers": catalog.samplers(), "schedulers": catalog.schedulers()}
