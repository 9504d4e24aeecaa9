"""What the web page's Upscale and Restore modes can choose from: the installed upscaler and
restorer models (``/v1/models`` lists the diffusion models, samplers and schedule types)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from malerei.serve.api.deps import CurrentUser, ServicesDep
from malerei.serve.errors import error_responses

router = APIRouter(prefix="/v1/web", tags=["web page"])

# What jobs that name none use (malerei.serve.catalog.ModelCatalog.resolve_tool).
BUILTIN = {"upscaler": "shapes-x4", "restorer": "shapes-restore"}


class ToolList(BaseModel):
    upscalers: list[str]
    restorers: list[str]
    default_upscaler: str | None
    default_restorer: str | None


def _default(kind: str, names: list[str]) -> str | None:
    if BUILTIN[kind] in names:
        return BUILTIN[kind]
    return names[0] if names else None


@router.get("/tools", response_model=ToolList, responses=error_responses(401, 429))
def tools(services: ServicesDep, _: CurrentUser) -> dict[str, Any]:
    """Installed upscalers and restorers by name, and the one the page preselects."""
    upscalers = sorted(services.catalog.tools("upscaler"))
    restorers = sorted(services.catalog.tools("restorer"))
    return {"upscalers": upscalers, "restorers": restorers,
            "default_upscaler": _default("upscaler", upscalers), "default_restorer": _default("restorer", restorers)}
