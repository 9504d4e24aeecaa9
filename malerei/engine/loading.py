"""Loading models, offline: diffusers folders and single-file checkpoints of SD 1.x, SD 2.x, SDXL.

    model = load_model("my-model")                       # name in the models folder, or a path
    model = load_model(None)                             # the built-in model (malerei/models/shapes)
    model = load_model("sd21-768.safetensors", prediction_type="v_prediction")
    with model.lock:                                     # one job at a time per model
        ...

- A diffusers folder (model_index.json + component folders) loads with
  StableDiffusionPipeline / StableDiffusionXLPipeline.from_pretrained(local_files_only=True).
  The family comes from its JSON configs (`model_dir.diffusers_folder_family`), the prediction
  type from scheduler/scheduler_config.json. Safety checkers are not loaded (malerei.safety does
  that job). Component weights that exist only as pickle (.bin) need allow_pickle=True.
- A single file goes through `single_file.load_single_file` (conversion rules there).
- `.ckpt/.pt/.pth/.bin` files are refused without allow_pickle (see checkpoint_files).

Nothing here contacts a network: `enforce_offline()` runs first and every loader gets
`local_files_only=True`. Errors users can cause are `malerei.engine.errors` exceptions.

Per-model defaults come from `malerei.json` in a diffusers folder, or `<stem>.malerei.json`
next to a single file (keys: sampler, scheduler, steps, cfg_scale, width, height); width and
height default to the model's native size (UNet sample size x VAE scale factor).
"""

from __future__ import annotations

import gc
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from malerei.engine.checkpoint_files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
from malerei.engine.devices import MemoryOptions
from malerei.engine.errors import InvalidParameter, ModelLoadError, ModelNotFound, PickleRefused
from malerei.engine.model_dir import (
    default_models_dir,
    diffusers_folder_family,
    diffusers_unet_weights,
    hash_cache,
    is_diffusers_folder,
    resolve_model,
    short_hash,
)

FAMILIES = ("sd1", "sd2", "sdxl")
DEFAULTS_FILE = "malerei.json"
_WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclass
class LoadedModel:
    name: str  # what users type: folder or file stem
    path: Path
    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    pipe: Any  # diffusers StableDiffusionPipeline / StableDiffusionXLPipeline (components used directly)
    short_hash: str  # A1111: first 10 hex of the file's SHA-256 (for a folder: of its UNet weights file)
    file_hashes: dict[str, str]  # relative file -> full sha256, recorded in the recipe
    defaults: dict  # per-model defaults (sampler, scheduler, steps, cfg_scale, width, height)
    # Held by whoever runs the pipe: a job, or a LoRA set (lora.lora_applied) that mutates the
    # shared model. Reentrant, so a job holding it may apply LoRAs inside.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    # Where LoRA and embedding names of this model's jobs resolve, and whether the user allowed
    # pickle files when loading it (LoRA/embedding files follow the same opt-in).
    models_dir: Path | None = None
    allow_pickle: bool = False


# ---------------------------------------------------------------------------------------------
# defaults

_DEFAULT_KEYS = {
    "sampler": str,
    "scheduler": str,
    "steps": int,
    "cfg_scale": (int, float),
    "width": int,
    "height": int,
    "clip_skip": int,
    "guidance_rescale": (int, float),
}


def read_defaults(path: Path) -> dict:
    """Validated per-model defaults from a malerei.json file (empty if the file does not exist)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: must hold a JSON object with keys {', '.join(_DEFAULT_KEYS)}")
    for key, value in data.items():
        kind = _DEFAULT_KEYS.get(key)
        if kind is None:
            raise ModelLoadError(f"{path}: unknown key {key!r}; allowed: {', '.join(_DEFAULT_KEYS)}")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ModelLoadError(f"{path}: {key} must be a {getattr(kind, '__name__', 'number')}, got {value!r}")
        if key in ("steps", "width", "height") and value <= 0:
            raise ModelLoadError(f"{path}: {key} must be positive, got {value}")
        if key in ("width", "height") and value % 8:
            raise ModelLoadError(f"{path}: {key} must be a multiple of 8, got {value}")
        if key == "cfg_scale" and value < 0:
            raise ModelLoadError(f"{path}: cfg_scale must not be negative, got {value}")
    return dict(data)


def native_size(pipe) -> int:
    """The resolution the model was trained at: UNet sample size x VAE scale factor (512, 768, 1024)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


# ---------------------------------------------------------------------------------------------
# diffusers folders


def _read_index(folder: Path) -> dict:
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ModelLoadError(f"{folder.name}/model_index.json: not valid JSON") from exc
    if not isinstance(index, dict):
        raise ModelLoadError(f"{folder.name}/model_index.json: not a JSON object")
    return index


def _component_weights(folder: Path, component: str, *, allow_pickle: bool) -> tuple[list[Path], str | None]:
    """(weight files diffusers will read for a component, variant) with the pickle rule applied."""
    comp = folder / component
    files = sorted(p for p in comp.iterdir() if p.is_file()) if comp.is_dir() else []
    safes = [p for p in files if p.suffix in SAFETENSORS_SUFFIXES]
    plain = [p for p in safes if ".fp16." not in p.name]
    if plain:
        return plain, None
    if safes:
        return safes, "fp16"
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    if not pickles:
        raise ModelLoadError(f"{folder.name}/{component} has no weights file (.safetensors)")
    if not allow_pickle:
        raise PickleRefused(
            f"{folder.name}/{component}/{pickles[0].name} is a pickle file, which can run code when "
            "loaded; refused. Convert the folder to .safetensors, or pass --allow-pickle "
            "(allow_pickle=True) if you trust it (loaded with weights_only=True)"
        )
    plain_pickles = [p for p in pickles if ".fp16." not in p.name]
    return (plain_pickles, None) if plain_pickles else (pickles, "fp16")


def _dtype_kwarg(torch_dtype) -> dict:
    """diffusers renamed from_pretrained's `torch_dtype` to `dtype` (the old name warns from 0.40 on)."""
    import diffusers
    from packaging.version import Version

    name = "dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype"
    return {name: torch_dtype}


def _on_device(pipe, device) -> bool:
    modules = [getattr(pipe, n, None) for n in _WEIGHT_COMPONENTS]
    return all(
        p.device == device for m in modules if m is not None for p in m.parameters()
    )


def _load_diffusers_folder(folder: Path, *, allow_pickle: bool, torch_dtype) -> tuple[Any, str, dict[str, str]]:
    """(pipe, family, {relative weight file: sha256}) for a diffusers folder, on the CPU."""
    index = _read_index(folder)
    family = diffusers_folder_family(folder)
    if family is None:
        raise ModelLoadError(
            f"{folder.name}: not an SD 1.x / SD 2.x / SDXL text-to-image model "
            f"(pipeline {index.get('_class_name')!r}); supported: StableDiffusionPipeline, StableDiffusionXLPipeline"
        )
    components = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for comp in components:
        spec = index.get(comp)
        if not (isinstance(spec, list) and spec and spec[0] is not None):
            what = "an SDXL refiner" if family == "sdxl" and comp == "text_encoder" else "incomplete"
            raise ModelLoadError(
                f"{folder.name}: model_index.json has no {comp}; the model is {what} and not supported"
            )
    files: dict[str, Path] = {}
    variants = set()
    for comp in components:
        weights, variant = _component_weights(folder, comp, allow_pickle=allow_pickle)
        variants.add(variant)
        files.update({f"{comp}/{p.name}": p for p in weights})
    variant = "fp16" if variants == {"fp16"} else None

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    kwargs: dict[str, Any] = {**_dtype_kwarg(torch_dtype), "local_files_only": True, "variant": variant}
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    if family == "sdxl":
        cls = StableDiffusionXLPipeline
    else:
        cls = StableDiffusionPipeline
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        pipe = cls.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{folder.name}: cannot load the diffusers folder: {first[:300]}") from exc
    return pipe, family, files


def _set_prediction_type(pipe, prediction_type: str) -> None:
    scheduler = pipe.scheduler
    if scheduler.config.get("prediction_type") != prediction_type:
        pipe.scheduler = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)


# ---------------------------------------------------------------------------------------------
# load_model


def load_model(
    ref: str | Path | None = None,
    *,
    models_dir: Path | None = None,
    allow_pickle: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    prediction_type: str | None = None,
    config_dir: Path | None = None,
    memory: MemoryOptions | None = None,
) -> LoadedModel:
    """Load a model by name (from `models_dir`), path, or None (the built-in model).

    prediction_type: override "epsilon" / "v_prediction" (default: from the folder's scheduler
    config, or the single-file rules in single_file.py). config_dir: a diffusers config folder for
    a single file of non-standard architecture. memory: diffusers' memory switches (devices.py).
    """
    from malerei.engine.offline import enforce_offline

    enforce_offline()
    from malerei.engine.devices import apply_memory_options, pick_device, pick_dtype, use_sdpa
    from malerei.engine.single_file import check_prediction_type, load_single_file, unet_predicts_v

    path = resolve_model(ref, models_dir)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    prediction_type = check_prediction_type(prediction_type)
    memory = memory or MemoryOptions()
    cache = hash_cache(models_dir if models_dir is not None else default_models_dir())

    if path.is_dir():
        if not is_diffusers_folder(path):
            raise ModelNotFound(f"{path}: a folder without model_index.json is not a diffusers model")
        if config_dir is not None:
            raise InvalidParameter("config_dir applies to single-file checkpoints only, not to diffusers folders")
        pipe, family, weight_files = _load_diffusers_folder(path, allow_pickle=allow_pickle, torch_dtype=torch_dtype)
        if prediction_type is not None:
            _set_prediction_type(pipe, prediction_type)
        unet_file = diffusers_unet_weights(path)
        file_hashes = {rel: cache.sha256(p) for rel, p in weight_files.items()}
        model_hash = short_hash(cache.sha256(unet_file)) if unet_file else short_hash(next(iter(file_hashes.values())))
        defaults_file = path / DEFAULTS_FILE
        probe_v = False
    else:
        result = load_single_file(
            path, allow_pickle=allow_pickle, torch_dtype=torch_dtype,
            prediction_type=prediction_type, config_dir=config_dir,
        )
        pipe, family = result.pipe, result.family
        probe_v = result.prediction_type is None
        sha = cache.sha256(path)
        file_hashes = {path.name: sha}
        model_hash = short_hash(sha)
        defaults_file = path.with_name(path.stem + "." + DEFAULTS_FILE)

    if memory.cpu_offload == "none" and not _on_device(pipe, torch_device):
        pipe.to(torch_device)
    apply_memory_options(
        pipe, attention_slicing=memory.attention_slicing, vae_tiling=memory.vae_tiling,
        vae_slicing=memory.vae_slicing, cpu_offload=memory.cpu_offload, device=torch_device,
    )
    if not memory.attention_slicing:
        use_sdpa(pipe)
    if probe_v:
        is_v = unet_predicts_v(pipe.unet)
        _set_prediction_type(pipe, "v_prediction" if is_v else "epsilon")
        if is_v and config_dir is None:
            pipe.unet.register_to_config(sample_size=96)  # SD 2.x 768-v: 768 px native
    defaults = {"width": native_size(pipe), "height": native_size(pipe), **read_defaults(defaults_file)}
    return LoadedModel(
        name=path.name if path.is_dir() else path.stem,
        path=path,
        family=family,
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        pipe=pipe,
        short_hash=model_hash,
        file_hashes=file_hashes,
        defaults=defaults,
        models_dir=Path(models_dir) if models_dir is not None else default_models_dir(),
        allow_pickle=allow_pickle,
    )


# ---------------------------------------------------------------------------------------------
# ModelCache


class ModelCache:
    """Loaded models kept between generations in one process, least recently used evicted first.

    Keyed by resolved path (+ the file's mtime and size, so a replaced file reloads), device,
    dtype, prediction type, config folder and memory options. Thread-safe: concurrent `get`s of
    the same key load it once; different keys load in parallel. A model handed out stays usable
    after eviction (the caller's reference keeps it alive); run jobs under `model.lock`.
    """

    def __init__(self, *, max_models: int = 1, loader: Callable[..., LoadedModel] = load_model):
        if max_models < 1:
            raise InvalidParameter(f"max_models must be at least 1, got {max_models}")
        self.max_models = max_models
        self._loader = loader
        self._models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[tuple, threading.Lock] = {}

    def key(
        self, ref: str | Path | None = None, *, models_dir: Path | None = None, device: str | None = None,
        dtype: str | None = None, prediction_type: str | None = None, config_dir: Path | None = None,
        memory: MemoryOptions | None = None,
    ) -> tuple:
        from malerei.engine.devices import pick_device, pick_dtype
        from malerei.engine.single_file import check_prediction_type

        path = resolve_model(ref, models_dir)
        stamp_file = diffusers_unet_weights(path) if path.is_dir() else path
        stat = stamp_file.stat() if stamp_file is not None and stamp_file.exists() else None
        torch_device = pick_device(device)
        return (
            str(path),
            (stat.st_mtime_ns, stat.st_size) if stat else None,
            str(torch_device),
            str(pick_dtype(dtype, torch_device)),
            check_prediction_type(prediction_type),
            str(Path(config_dir).resolve()) if config_dir is not None else None,
            memory or MemoryOptions(),
        )

    def get(
        self, ref: str | Path | None = None, *, models_dir: Path | None = None, allow_pickle: bool = False,
        device: str | None = None, dtype: str | None = None, prediction_type: str | None = None,
        config_dir: Path | None = None, memory: MemoryOptions | None = None,
    ) -> LoadedModel:
        """The cached model for these arguments, loading it (once) if needed. Same arguments as load_model."""
        key = self.key(ref, models_dir=models_dir, device=device, dtype=dtype,
                       prediction_type=prediction_type, config_dir=config_dir, memory=memory)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._models:
                    self._models.move_to_end(key)
                    return self._models[key]
            try:
                model = self._loader(
                    Path(key[0]), models_dir=models_dir, allow_pickle=allow_pickle, device=device, dtype=dtype,
                    prediction_type=prediction_type, config_dir=config_dir, memory=memory,
                )
            finally:
                with self._lock:
                    self._key_locks.pop(key, None)
            with self._lock:
                self._models[key] = model
                evicted = []
                while len(self._models) > self.max_models:
                    evicted.append(self._models.popitem(last=False)[1])
        if evicted:
            self._release(evicted)
        return model

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)

    def __contains__(self, key: tuple) -> bool:
        with self._lock:
            return key in self._models

    def models(self) -> list[LoadedModel]:
        """The cached models, least recently used first."""
        with self._lock:
            return list(self._models.values())

    def clear(self) -> None:
        with self._lock:
            evicted = list(self._models.values())
            self._models.clear()
        self._release(evicted)

    @staticmethod
    def _release(models: list[LoadedModel]) -> None:
        on_gpu = any(str(getattr(m.pipe, "device", "cpu")).startswith("cuda") for m in models)
        models.clear()
        gc.collect()
        if on_gpu:
            import torch

            torch.cuda.empty_cache()
