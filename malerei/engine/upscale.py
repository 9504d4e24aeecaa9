"""Super-resolution and restoration networks through spandrel, run in overlapping tiles.

    upscaler = load_upscaler("4x-UltraSharp", models_dir=...)   # a name in the models folder
    upscaler = load_upscaler("/path/RealESRGAN_x4plus.pth", allow_pickle=True)
    upscaler = load_upscaler(None)                              # the built-in shapes-world model
    big = upscale_image(upscaler, image, 4)

Weights: ``.safetensors``, or a pickle file (``.pth``, ``.pt``, ``.ckpt``, ``.bin``) only with
``allow_pickle`` and then through ``torch.load(weights_only=True)``
(:func:`malerei.engine.checkpoint_files.load_pickle_object`). The state dict is loaded here and
handed to spandrel's ``ModelLoader.load_from_state_dict``; spandrel's own file loading is never
used (it would ``torch.jit.load`` a ``.pt`` file, which can run code). spandrel then detects the
architecture (ESRGAN/Real-ESRGAN RRDBNet, SwinIR, Compact, HAT, DAT, GFPGAN, ... and, when
``spandrel_extra_arches`` is installed, CodeFormer and friends).

Names are looked up in the models folder's A1111 / ComfyUI subfolders (:data:`UPSCALER_DIRS`,
:data:`RESTORER_DIRS`) by file stem.

Tiling (:func:`run_tiled`): the input is cut into ``tile`` x ``tile`` cores; each core runs with
``overlap`` px of real image around it as context and only the core's output is kept, so memory
is bounded by one (tile + 2 overlap)^2 input and the result equals the untiled one wherever the
network's receptive field fits into the overlap (convolutional networks with few layers: exactly).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from malerei.engine.errors import InvalidParameter, ModelLoadError, ModelNotFound

if TYPE_CHECKING:
    import PIL.Image
    import torch

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "models"
BUILTIN_UPSCALER = BUILTIN_DIR / "upscaler" / "shapes-x4.safetensors"
BUILTIN_RESTORER = BUILTIN_DIR / "restorer" / "shapes-restore.safetensors"
UPSCALER_DIRS = ("ESRGAN", "RealESRGAN", "SwinIR", "DAT", "HAT", "upscale_models", "Upscalers")
RESTORER_DIRS = ("GFPGAN", "Codeformer", "CodeFormer", "facerestore_models", "Restorers")
SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
SR_PURPOSES = ("SR",)
RESTORE_PURPOSES = ("FaceSR", "Restoration")
DEFAULT_TILE = 192
DEFAULT_OVERLAP = 32
MAX_OUTPUT_PIXELS = 8192 * 8192


@dataclass
class Upscaler:
    """A loaded spandrel image model and what malerei records about it."""

    name: str  # file stem, or "shapes-x4" / "shapes-restore" for the built-ins
    path: Path
    architecture: str  # spandrel's id: "ESRGAN", "SwinIR", "GFPGAN", "CodeFormer", "Compact", ...
    purpose: str  # "SR", "FaceSR", "Restoration"
    scale: int
    short_hash: str  # A1111 style: first 10 hex of the file's sha256
    descriptor: Any = field(repr=False)  # spandrel ImageModelDescriptor

    @property
    def square_input(self) -> int | None:
        """The fixed square input side of face models (GFPGAN, CodeFormer: 512), else None."""
        req = self.descriptor.size_requirements
        if self.purpose == "FaceSR":
            return max(req.minimum, req.multiple_of, 512)
        return None


# ---------------------------------------------------------------------------------------------
# Finding and loading


def _registry():
    """spandrel's architectures, plus spandrel_extra_arches' (CodeFormer, ...) when installed,
    in a registry of our own (spandrel's global one is left as it is)."""
    import warnings

    with warnings.catch_warnings():  # some architectures call torch.jit.script at import
        warnings.simplefilter("ignore", FutureWarning)
        from spandrel import MAIN_REGISTRY, ArchRegistry

        registry = ArchRegistry()
        registry.add(*MAIN_REGISTRY)
        try:
            from spandrel_extra_arches import EXTRA_REGISTRY
        except ImportError:
            return registry
    registry.add(*EXTRA_REGISTRY, ignore_duplicates=True)
    return registry


def _looks_like_path(ref: str) -> bool:
    return "/" in ref or "\\" in ref or ref.lower().endswith(SUFFIXES) or ref.startswith(".")


def list_model_files(models_dir: Path | None, subdirs: tuple[str, ...]) -> list[Path]:
    from malerei.engine.model_dir import default_models_dir

    root = Path(models_dir) if models_dir is not None else default_models_dir()
    found = []
    for sub in subdirs:
        folder = root / sub
        if folder.is_dir():
            found += sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    return found


def resolve_file(ref: str | Path | None, *, models_dir: Path | None, subdirs: tuple[str, ...], builtin: Path,
                 what: str) -> Path:
    """A model file from a path, a name (file stem) in the models folder's subfolders, or None (built-in)."""
    if ref is None:
        if not builtin.is_file():
            raise ModelNotFound(
                f"the built-in {what} ({builtin.relative_to(BUILTIN_DIR.parent)}) is not in this install yet; "
                f"pass --model NAME|PATH (a file, or the name of one in {', '.join(subdirs)} of the models folder)")
        return builtin
    text = str(ref)
    path = Path(text).expanduser()
    if isinstance(ref, Path) or _looks_like_path(text) or path.exists():
        if not path.exists():
            raise ModelNotFound(f"{what} {text}: no such file")
        if not path.is_file():
            raise ModelNotFound(f"{what} {text}: not a file")
        return path
    files = list_model_files(models_dir, subdirs)
    matches = [p for p in files if p.stem == text] or [p for p in files if p.stem.lower() == text.lower()]
    if not matches:
        known = ", ".join(sorted({p.stem for p in files})[:20]) or "none"
        raise ModelNotFound(f"no {what} named {text!r} in the models folder ({', '.join(subdirs)}); known: {known}")
    return matches[0]


def load_state_dict(path: Path, *, allow_pickle: bool) -> dict:
    """The weights of ``path`` (safetensors; pickle only when allowed, weights_only=True),
    unwrapped the way spandrel expects (``params_ema``, ``params``, ``state_dict``, ``module.``)."""
    from malerei.engine.checkpoint_files import (
        PICKLE_SUFFIXES,
        SAFETENSORS_SUFFIXES,
        load_pickle_object,
        load_state_dict as load_flat,
    )

    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        state = load_flat(path)
    elif suffix in PICKLE_SUFFIXES:
        state = load_pickle_object(path, allow_pickle=allow_pickle)
        if not isinstance(state, dict):
            raise ModelLoadError(f"{path.name}: holds a {type(state).__name__}, not a table of weights")
    else:
        raise ModelLoadError(f"{path.name}: unsupported file type {path.suffix!r}; allowed: .safetensors "
                             f"(and {', '.join(PICKLE_SUFFIXES)} with --allow-pickle)")
    _registry()  # imports spandrel quietly
    from spandrel import canonicalize_state_dict

    return canonicalize_state_dict(state)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_spandrel(path: Path, *, allow_pickle: bool = False, device: str | None = None,
                  purposes: tuple[str, ...] = SR_PURPOSES + RESTORE_PURPOSES, what: str = "model",
                  name: str | None = None) -> Upscaler:
    """Load one weights file through spandrel; its purpose must be one of ``purposes``."""
    from malerei.engine.devices import pick_device

    path = Path(path)
    state = load_state_dict(path, allow_pickle=allow_pickle)
    from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError

    try:
        descriptor = ModelLoader(device="cpu", registry=_registry()).load_from_state_dict(state)
    except UnsupportedModelError:
        raise ModelLoadError(f"{path.name}: not an image model architecture spandrel knows (ESRGAN, Real-ESRGAN, "
                             "SwinIR, HAT, DAT, Compact, GFPGAN, CodeFormer, ...)") from None
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AssertionError) as exc:
        first = " ".join(str(exc).split())[:240] or type(exc).__name__
        raise ModelLoadError(f"{path.name}: the weights do not fit their detected architecture ({first})") from None
    if not isinstance(descriptor, ImageModelDescriptor):
        raise ModelLoadError(f"{path.name}: a {descriptor.purpose} model ({descriptor.architecture.id}); "
                             f"a {what} takes one image in and gives one image out")
    if descriptor.purpose not in purposes:
        article = "an" if what[0] in "aeiou" else "a"
        raise ModelLoadError(f"{path.name}: a {descriptor.purpose} model ({descriptor.architecture.id}) is not "
                             f"{article} {what}; allowed purposes: {', '.join(purposes)}")
    descriptor.to(pick_device(device)).eval()
    return Upscaler(name=name or path.stem, path=path, architecture=str(descriptor.architecture.id),
                    purpose=descriptor.purpose, scale=int(descriptor.scale), short_hash=_sha256(path)[:10],
                    descriptor=descriptor)


def load_upscaler(ref: str | Path | None = None, *, models_dir: Path | None = None, allow_pickle: bool = False,
                  device: str | None = None) -> Upscaler:
    """A super-resolution model by name, path, or None (the built-in shapes-world x4 model)."""
    from malerei.engine.offline import enforce_offline

    enforce_offline()
    path = resolve_file(ref, models_dir=models_dir, subdirs=UPSCALER_DIRS, builtin=BUILTIN_UPSCALER, what="upscaler")
    return load_spandrel(path, allow_pickle=allow_pickle, device=device, purposes=SR_PURPOSES, what="upscaler",
                         name="shapes-x4" if ref is None else None)


# ---------------------------------------------------------------------------------------------
# Running


def _check_tiling(tile: int, overlap: int) -> None:
    if isinstance(tile, bool) or not isinstance(tile, int) or not 16 <= tile <= 4096:
        raise InvalidParameter(f"tile size {tile!r} is out of range; allowed: 16..4096")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap <= 1024:
        raise InvalidParameter(f"tile overlap {overlap!r} is out of range; allowed: 0..1024")


def run_tiled(fn, x: torch.Tensor, scale: int, *, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
              out_channels: int | None = None) -> torch.Tensor:
    """``fn`` ([1, C, h, w] -> [1, C', h*scale, w*scale]) over ``x`` in tiles with context (see the
    module docstring). An input that fits one tile runs whole."""
    import torch

    _check_tiling(tile, overlap)
    _, channels, height, width = x.shape
    if height <= tile and width <= tile:
        return fn(x)
    out = torch.zeros(x.shape[0], out_channels or channels, height * scale, width * scale, dtype=x.dtype,
                      device=x.device)
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            t0, l0 = max(top - overlap, 0), max(left - overlap, 0)
            t1, l1 = min(bottom + overlap, height), min(right + overlap, width)
            result = fn(x[:, :, t0:t1, l0:l1])
            ys, xs = (top - t0) * scale, (left - l0) * scale
            out[:, :, top * scale:bottom * scale, left * scale:right * scale] = \
                result[:, :, ys:ys + (bottom - top) * scale, xs:xs + (right - left) * scale]
    return out


def _forward(model: Upscaler):
    import torch

    descriptor = model.descriptor
    param = next(descriptor.model.parameters())

    def fn(tile: torch.Tensor) -> torch.Tensor:
        return descriptor(tile.to(param.device, param.dtype)).to(tile.device, tile.dtype)

    return fn


def apply_model(model: Upscaler, image: PIL.Image.Image, *, tile: int = DEFAULT_TILE,
                overlap: int = DEFAULT_OVERLAP) -> PIL.Image.Image:
    """One pass of ``model`` over ``image`` (RGB), in tiles: output is ``model.scale`` times larger."""
    from malerei.engine import images

    w, h = image.size
    if w * h * model.scale**2 > MAX_OUTPUT_PIXELS:
        raise InvalidParameter(f"the result would be {w * model.scale}x{h * model.scale} pixels; at most "
                               f"{MAX_OUTPUT_PIXELS} pixels are allowed")
    x = images.to_tensor(images.to_rgb(image), low=0.0)
    y = run_tiled(_forward(model), x, model.scale, tile=tile, overlap=overlap,
                  out_channels=model.descriptor.output_channels)
    return images.from_tensor(y, low=0.0)[0]


def check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 1.0 <= scale <= 8.0:
        raise InvalidParameter(f"upscale factor {scale!r} is out of range; allowed: 1..8")
    return float(scale)


def upscale_image(model: Upscaler | None, image: PIL.Image.Image, scale: float, *, tile: int = DEFAULT_TILE,
                  overlap: int = DEFAULT_OVERLAP) -> PIL.Image.Image:
    """``image`` enlarged ``scale`` times: ``model`` run as often as needed (at most 3 passes, as
    A1111 does), then resized to exactly round(size * scale) with Lanczos. ``model`` None: Lanczos only."""
    from PIL import Image

    from malerei.engine import images

    scale = check_scale(scale)
    image = images.to_rgb(image)
    target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if target[0] * target[1] > MAX_OUTPUT_PIXELS:
        raise InvalidParameter(f"the result would be {target[0]}x{target[1]} pixels; at most {MAX_OUTPUT_PIXELS} "
                               "pixels are allowed")
    current = image
    if model is not None and model.scale > 1:
        for _ in range(3):
            if current.width >= target[0] and current.height >= target[1]:
                break
            current = apply_model(model, current, tile=tile, overlap=overlap)
    if current.size != target:
        current = current.resize(target, Image.Resampling.LANCZOS)
    return current


def upscale_latents(latents: torch.Tensor, width: int, height: int, mode: str = "bilinear",
                    antialias: bool = False) -> torch.Tensor:
    """Latents resized to ``width`` x ``height`` latent pixels (A1111's "Latent" hires upscalers)."""
    import torch.nn.functional as F

    kwargs = {"antialias": antialias} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(latents.float(), size=(height, width), mode=mode, **kwargs).to(latents.dtype)
