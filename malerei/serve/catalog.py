"""Which models and samplers this server offers, and their defaults, without loading torch.

The API resolves every job to concrete parameters at submission (model defaults filled in), so a
job's cost and batch key are exact before it is queued. The engine's own scan and sampler
registry are used when present.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from malerei.serve.errors import ApiError

# Used when a model folder has no malerei.json and the engine offers no defaults.
FALLBACK_DEFAULTS = {"sampler": "Euler", "scheduler": "Automatic", "steps": 20, "cfg_scale": 7.0,
                     "width": 512, "height": 512}

# A1111 sampler names, for when the engine's registry cannot be read.
FALLBACK_SAMPLERS = ["Euler", "Euler a", "DDIM", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "Heun", "LMS",
                     "DPM2", "DPM2 a", "DPM++ 2S a", "UniPC"]


@dataclass(kw_only=True)
class ModelInfo:
    name: str
    title: str
    filename: str
    short_hash: str | None = None
    family: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)


def _builtin_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "models" / "shapes"


def _read_defaults(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / "malerei.json").read_text())
    except (OSError, ValueError):
        return {}
    defaults = data.get("defaults", data) if isinstance(data, dict) else {}
    return {k: v for k, v in defaults.items() if k in FALLBACK_DEFAULTS}


class ModelCatalog:
    """Lists models (cached a few seconds) and fills defaults into job parameters."""

    BUILTIN = "shapes"

    def __init__(self, models_dir: Path | None, *, ttl_s: float = 5.0) -> None:
        self.models_dir = models_dir
        self.ttl_s = ttl_s
        self._cached: tuple[float, list[ModelInfo]] | None = None
        self._lock = threading.Lock()

    def models(self) -> list[ModelInfo]:
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > self.ttl_s:
                self._cached = (time.monotonic(), self._scan())
            return list(self._cached[1])

    def _scan(self) -> list[ModelInfo]:
        found = [ModelInfo(name=self.BUILTIN, title=f"{self.BUILTIN} (built-in)", filename=str(_builtin_dir()),
                           family="builtin", defaults={**FALLBACK_DEFAULTS, **_read_defaults(_builtin_dir())})]
        root = self.models_dir
        if root is not None and root.is_dir():
            for entry in sorted(root.iterdir()):
                if entry.name.startswith("."):
                    continue
                if entry.is_dir() and (entry / "model_index.json").is_file():
                    found.append(ModelInfo(name=entry.name, title=entry.name, filename=str(entry),
                                           defaults={**FALLBACK_DEFAULTS, **_read_defaults(entry)}))
                elif entry.suffix in (".safetensors", ".ckpt") and entry.is_file():
                    found.append(ModelInfo(name=entry.stem, title=entry.name, filename=str(entry),
                                           defaults=dict(FALLBACK_DEFAULTS)))
        return found

    def resolve(self, name: str | None) -> ModelInfo:
        models = self.models()
        if name is None:
            return models[0]
        for info in models:
            if name in (info.name, info.title):
                return info
        names = ", ".join(m.name for m in models)
        raise ApiError(422, "model_not_found", f"no model named {name!r}; available: {names}")

    def samplers(self) -> list[str]:
        try:
            from malerei.engine import samplers as engine_samplers

            names = getattr(engine_samplers, "SAMPLER_NAMES", None) or list(getattr(engine_samplers, "SAMPLERS", {}))
            if names:
                return list(names)
        except ImportError:
            pass
        return list(FALLBACK_SAMPLERS)

    def schedulers(self) -> list[str]:
        try:
            from malerei.engine import samplers as engine_samplers

            names = getattr(engine_samplers, "SCHEDULE_TYPES", None)
            if names:
                return list(names)
        except ImportError:
            pass
        return ["Automatic", "Uniform", "Karras", "Exponential"]
