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

from malerei.engine.errors import MalereiError
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


def _read_defaults(path: Path) -> dict[str, Any]:
    """A model's malerei.json defaults (the engine's validated reader when present)."""
    try:
        from malerei.engine.loading import read_defaults

        return dict(read_defaults(path))
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - a broken malerei.json fails at load time, with its message
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if k in FALLBACK_DEFAULTS} if isinstance(data, dict) else {}


def _native_side(folder: Path) -> int | None:
    """UNet sample size x VAE scale factor of a diffusers folder, read from its configs."""
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


_FAMILY_SIDE = {"sdxl": 1024, "sd2": 768, "sd1": 512}


def _defaults(path: Path, family: str | None) -> dict[str, Any]:
    side = _native_side(path) if path.is_dir() else _FAMILY_SIDE.get(family or "", 512)
    file = path / "malerei.json" if path.is_dir() else path.with_name(f"{path.stem}.malerei.json")
    base = {**FALLBACK_DEFAULTS, "width": side or 512, "height": side or 512}
    return {**base, **_read_defaults(file)}


class ModelCatalog:
    """Lists models (cached a few seconds) and fills defaults into job parameters."""

    BUILTIN = "shapes"

    def __init__(self, models_dir: Path | None, *, default: str | None = None, ttl_s: float = 5.0) -> None:
        self.models_dir = models_dir
        self.default = default
        self.ttl_s = ttl_s
        self._cached: tuple[float, list[ModelInfo]] | None = None
        self._lock = threading.Lock()

    def models(self) -> list[ModelInfo]:
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > self.ttl_s:
                self._cached = (time.monotonic(), self._scan())
            return list(self._cached[1])

    def _scan(self) -> list[ModelInfo]:
        builtin = _builtin_dir()
        found = []
        if (builtin / "model_index.json").is_file():
            found.append(ModelInfo(name=self.BUILTIN, title=f"{self.BUILTIN} (built-in)", filename=str(builtin),
                                   family="builtin", defaults=_defaults(builtin, None)))
        root = self.models_dir
        if root is None or not root.is_dir():
            return found
        try:
            from malerei.engine.model_dir import list_models
        except ImportError:
            return found
        for entry in list_models(root, hashes=False):
            if entry.name == self.BUILTIN:
                continue
            found.append(ModelInfo(name=entry.name, title=entry.name, filename=str(entry.path),
                                   family=entry.family_if_cheap, defaults=_defaults(entry.path, entry.family_if_cheap)))
        return found

    def resolve(self, name: str | None) -> ModelInfo:
        models = self.models()
        if not models:
            raise ApiError(422, "model_not_found", "no models are installed: the built-in model is missing and "
                                                   f"the models folder {self.models_dir} has none")
        if name is None:
            if self.default is None:
                return models[0]
            name = self.default
        for info in models:
            if name in (info.name, info.title):
                return info
        names = ", ".join(m.name for m in models)
        raise ApiError(422, "model_not_found", f"no model named {name!r}; available: {names}")

    def engine_ref(self, name: str | None) -> Path | None:
        """What the engine loads for a model name: None for the built-in model, else its path."""
        info = self.resolve(name)
        return None if info.family == "builtin" else Path(info.filename)

    def samplers(self) -> list[str]:
        try:
            from malerei.engine.samplers import list_samplers

            return [info.name for info in list_samplers()]
        except ImportError:
            return list(FALLBACK_SAMPLERS)

    def schedulers(self) -> list[str]:
        try:
            from malerei.engine.samplers import list_schedules

            return [info.label for info in list_schedules()]
        except ImportError:
            return ["Automatic", "Uniform", "Karras", "Exponential"]

    def check_sampler(self, name: str) -> str:
        """The canonical sampler name for ``name`` (aliases allowed), or a 422 listing them."""
        try:
            from malerei.engine.samplers import find_sampler
        except ImportError:
            if name in FALLBACK_SAMPLERS:
                return name
        else:
            try:
                return find_sampler(name).name
            except MalereiError:
                pass
        raise ApiError(422, "unknown_sampler", f"unknown sampler {name!r}; available: {', '.join(self.samplers())}")

    def check_scheduler(self, name: str) -> str:
        try:
            from malerei.engine.samplers import find_schedule
        except ImportError:
            if name in self.schedulers():
                return name
        else:
            try:
                return find_schedule(name).label
            except MalereiError:
                pass
        raise ApiError(422, "unknown_scheduler",
                       f"unknown schedule type {name!r}; available: {', '.join(self.schedulers())}")


    # ------------------------------------------------------------------ upscalers and restorers
    def tools(self, kind: str) -> dict[str, Path]:
        """Upscaler (``kind="upscaler"``) or restorer model files by name: the models folder's
        A1111/ComfyUI subfolders, plus the built-in one when it is installed."""
        try:
            from malerei.engine import upscale
        except ImportError:
            return {}
        subdirs, builtin, builtin_name = {
            "upscaler": (upscale.UPSCALER_DIRS, upscale.BUILTIN_UPSCALER, "shapes-x4"),
            "restorer": (upscale.RESTORER_DIRS, upscale.BUILTIN_RESTORER, "shapes-restore"),
        }[kind]
        found = {}
        if builtin.is_file():
            found[builtin_name] = builtin
        if self.models_dir is not None and self.models_dir.is_dir():
            for path in upscale.list_model_files(self.models_dir, subdirs):
                found.setdefault(path.stem, path)
        return found

    def resolve_tool(self, kind: str, name: str | None) -> str:
        """The name of an installed upscaler/restorer (the built-in one for None), or a 422."""
        tools = self.tools(kind)
        default = {"upscaler": "shapes-x4", "restorer": "shapes-restore"}[kind]
        wanted = name or default
        if wanted in tools:
            return wanted
        known = ", ".join(sorted(tools)) or "none installed"
        raise ApiError(422, f"{kind}_not_found", f"no {kind} named {wanted!r}; available: {known}")
